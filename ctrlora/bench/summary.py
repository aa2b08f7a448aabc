"""Turn the bench's raw measurements into ratios against LoRA, curvature fractions, and the tables.

Curvature work of a method at a calibration size N (N_b the size the bench ran, both capped at
the number of training examples):

    W(N) = S + E·(N/N_b − 1) + k·(R + E_r·(N/N_b − 1))

with S the method's set-up time minus LoRA's (its initial estimate at N_b plus what does not grow
with N: spectra, allocation, CG-LoRA's η search), E the initial estimates' own `estimate_s` (the
part linear in N), k the refreshes a run of L = `train_length` steps makes at the method's default
cadence (every step 0 < s < L with s ≡ 0 mod `refresh_every`), R one refresh's seconds at N_b and
E_r its estimate's `estimate_s`. The reported fraction is W(N) / (L × the method's median step time).
"""

from __future__ import annotations

from typing import Any

from ctrlora.bench.config import REFERENCE_METHOD

MIB = 2**20


def refresh_count(train_length: int, refresh_every: int) -> int:
    """Refreshes in a run of `train_length` steps: at every multiple of `refresh_every` below it."""
    return len(range(refresh_every, train_length, refresh_every))


def curvature_work(
    row: dict[str, Any], reference_setup_s: float, samples: int, train_length: int, refresh_every: int
) -> dict[str, Any] | None:
    """W(N) of the module docstring and its fraction of the run, or None for a method without curvature."""
    curvature = row["results"]["train"].get("curvature")
    if curvature is None:
        return None
    scale = min(samples, row["num_examples"]) / row["calibration_examples"] - 1.0
    setup_extra = row["setup_s"] - reference_setup_s
    initial = setup_extra + curvature["calibration_s"] * scale
    refreshes = curvature.get("refreshes", [])
    count = refresh_count(train_length, refresh_every) if refreshes else 0
    per_refresh = 0.0
    if refreshes:
        refresh_estimates = [e["estimate_s"] for e in curvature["estimates"] if e["label"] == "refresh"]
        seconds = sum(refresh["seconds"] for refresh in refreshes) / len(refreshes)
        per_refresh = seconds + sum(refresh_estimates) / len(refreshes) * scale
    total = initial + count * per_refresh
    return {
        "samples": samples,
        "initial_s": initial,
        "refreshes": count,
        "per_refresh_s": per_refresh,
        "total_s": total,
        "fraction": total / (train_length * row["step_time"]["median_s"]),
    }


def summarise(
    methods: dict[str, dict[str, Any]], bare: dict[str, Any], estimators: dict[str, dict[str, Any]],
    defaults: dict[str, dict[str, int]], train_length: int, fraction_samples: list[int],
) -> dict[str, Any]:
    """Add to the raw rows: ratios against LoRA, curvature work and fractions, the overhead, and each
    estimator's time per batch in LoRA steps. `defaults` holds each method's default
    `calibration_samples` and `refresh_every` (from conf/train.yaml without the bench's overrides)."""
    reference = methods[REFERENCE_METHOD]
    reference_step = reference["step_time"]["median_s"]
    reference_peak = reference["peak_memory_bytes"]["train"]
    for name, row in methods.items():
        row["step_time_vs_lora"] = row["step_time"]["median_s"] / reference_step
        row["cpu_time_vs_lora"] = _cpu_ratios(row["step_time"], reference["step_time"])
        row["peak_memory_vs_lora"] = row["peak_memory_bytes"]["train"] / max(reference_peak, 1)
        row["setup_vs_lora_s"] = row["setup_s"] - reference["setup_s"]
        samples = list(dict.fromkeys([defaults[name]["calibration_samples"], *fraction_samples]))
        works = [
            curvature_work(row, reference["setup_s"], n, train_length, defaults[name]["refresh_every"])
            for n in samples
        ]
        row["curvature_work"] = [work for work in works if work is not None] or None
    cpu_ratios = _cpu_ratios(reference["step_time"], bare["step_time"])
    overhead = {
        "lightning_median_s": reference_step,
        "bare_median_s": bare["step_time"]["median_s"],
        "overhead": reference_step / bare["step_time"]["median_s"] - 1.0,
        "cpu_overhead": cpu_ratios and {key: ratio - 1.0 for key, ratio in cpu_ratios.items()},
        "loss_max_abs_diff": max(
            (abs(a - b) for a, b in zip(reference["losses"], bare["losses"], strict=False)), default=None
        ),
        "bare": bare,
    }
    cpu_step = reference["step_time"]["cpu_median_s"]
    for row in estimators.values():
        row["per_batch_vs_lora_step"] = row["per_batch_s"] / reference_step
        row["flops_vs_lora_step"] = row["flops_one_batch"] / bare["step_flops"]
        row["cpu_per_batch_vs_lora_step"] = cpu_step and row["cpu_per_batch_s"] / cpu_step
        # what a run pays per batch: the fixed cost spread over the default calibration set's batches
        clock, step = ("cpu_", cpu_step) if cpu_step else ("", reference_step)
        if row[f"{clock}fixed_s"] is not None:
            batches = row["calibration_batches"]
            row["run_per_batch_vs_lora_step"] = (row[f"{clock}fixed_s"] / batches + row[f"{clock}per_batch_s"]) / step
        else:
            row["run_per_batch_vs_lora_step"] = None
    return {"methods": methods, "overhead": overhead, "estimators": estimators}


def _cpu_ratios(timing: dict[str, Any], reference: dict[str, Any]) -> dict[str, float] | None:
    """CPU-time ratios of two step-time summaries, by median and by fastest step (None on a GPU)."""
    if timing["cpu_median_s"] is None:
        return None
    return {key: timing[f"cpu_{key}_s"] / reference[f"cpu_{key}_s"] for key in ("median", "min")}


def _samples_columns(methods: dict[str, dict[str, Any]]) -> list[int]:
    columns: list[int] = []
    for row in methods.values():
        for work in row["curvature_work"] or []:
            if work["samples"] not in columns:
                columns.append(work["samples"])
    return columns


def _optional(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _cpu_text(ratios: dict[str, float] | None, spec: str) -> str:
    return "–" if ratios is None else f"{format(ratios['median'], spec)} / {format(ratios['min'], spec)}"


def markdown(summary: dict[str, Any]) -> str:
    """The tables of `bench/results.md`."""
    settings, environment = summary["settings"], summary["environment"]
    methods, overhead = summary["methods"], summary["overhead"]
    columns = _samples_columns(methods)
    lines = [
        f"# ctrlora bench: {settings['model']} ({environment['backbone_params'] / 1e6:.1f}M parameters)"
        f" on {environment['device']}",
        "",
        f"Budget rank r̄ = {environment['budget_rank']}; packed batches of {settings['batch_size']} ×"
        f" {settings['seq_len']} tokens; {settings['steps']} timed steps after {settings['warmup']} warm-up;"
        f" {environment['torch_threads']} torch thread(s); load average {environment['load_average']}."
        " Step = one whole loop iteration (wall clock, median). CPU = the main thread's CPU time of the"
        " median / the fastest step: other processes inflate it less than the wall clock, the fastest step"
        " least (interference only adds time). Memory: peak above the process at rest (CUDA max allocated,"
        " or sampled anonymous RSS on CPU: the mapped checkpoint's file pages are not counted, whichever"
        " phase first reads them; glibc's retained free memory is).",
        "",
        "| method | step (ms) | step vs LoRA | CPU vs LoRA (median / min) | tokens/s | train peak (MiB) |"
        " mem vs LoRA | setup peak (MiB) | setup vs LoRA (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in methods.items():
        peak = row["peak_memory_bytes"]
        lines.append(
            f"| {name} | {row['step_time']['median_s'] * 1e3:.0f} | {row['step_time_vs_lora']:.3f} |"
            f" {_cpu_text(row['cpu_time_vs_lora'], '.3f')} | {row['tokens_per_s']:.0f} |"
            f" {peak['train'] / MIB:.0f} | {row['peak_memory_vs_lora']:.2f} | {peak['setup'] / MIB:.0f} |"
            f" {row['setup_vs_lora_s']:+.1f} |"
        )
    lines += [
        "",
        f"Curvature work (initial estimate + refreshes at each method's default cadence) as a fraction of a"
        f" {settings['train_length']}-step run, by `calibration.num_samples` = N (run at"
        f" N = {settings['calibration_samples']}, the estimates extrapolated linearly in N):",
        "",
        "| method | " + " | ".join(f"N={n}" for n in columns) + " | "
        + " | ".join(f"initial + refreshes (s), N={n}" for n in columns) + " |",
        "|---|" + "---:|" * (2 * len(columns)),
    ]
    for name, row in methods.items():
        works = {work["samples"]: work for work in row["curvature_work"] or []}
        if not works:
            continue
        fractions = [f"{works[n]['fraction']:.2%}" if n in works else "–" for n in columns]
        parts = [
            f"{works[n]['initial_s']:.0f} + {works[n]['refreshes']} × {works[n]['per_refresh_s']:.0f}"
            if n in works else "–" for n in columns
        ]
        lines.append(f"| {name} | " + " | ".join(fractions) + " | " + " | ".join(parts) + " |")
    lines += [
        "",
        f"Framework overhead (the LoRA steps through Lightning vs a bare PyTorch + PEFT loop):"
        f" {overhead['lightning_median_s'] * 1e3:.0f} ms vs {overhead['bare_median_s'] * 1e3:.0f} ms a step,"
        f" **{overhead['overhead']:+.1%}** wall clock, {_cpu_text(overhead['cpu_overhead'], '+.1%')} CPU time"
        " (median / fastest step)"
        f" (largest loss difference {_optional(overhead['loss_max_abs_diff'], '.2g')}).",
        "",
        "Estimators: one more calibration batch (the difference between estimates on 1 and on n batches), the"
        " fixed cost (hooks, factor storage, final eigendecompositions), and both together per batch of the"
        " default calibration set; ratios in CPU time on a CPU, wall clock on a GPU. FLOPs: the matrix"
        " products of an estimate on one batch against a LoRA step's forward and backward"
        f" ({summary['overhead']['bare']['step_flops'] / 1e9:.2f} GFLOP), counted, not timed.",
        "",
        "| estimator | s / batch (wall) | × LoRA step (wall) | × LoRA step (CPU) | × LoRA step (FLOPs) |"
        " fixed s (wall) | × LoRA step per batch of a default run | batches timed | tokens / batch | peak (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary["estimators"].items():
        lines.append(
            f"| {name} | {row['per_batch_s']:.2f} | {row['per_batch_vs_lora_step']:.2f} |"
            f" {_optional(row['cpu_per_batch_vs_lora_step'], '.2f')} | {row['flops_vs_lora_step']:.2f} |"
            f" {_optional(row['fixed_s'], '.2f')} |"
            f" {_optional(row['run_per_batch_vs_lora_step'], '.2f')} ({row['calibration_batches']} batches) |"
            f" {row['batches']} | {row['tokens_per_batch']:.0f} | {row['peak_memory_bytes'] / MIB:.0f} |"
        )
    evaluation = summary.get("evaluation")
    if evaluation:
        scores = "; ".join(
            f"{task} accuracy {score['ours']:.4f} (ours) vs {score['lm_eval_cli']:.4f} (CLI)"
            for task, score in evaluation["accuracy"].items()
        )
        lines += [
            "",
            f"Evaluation ({evaluation['limit']} documents of {', '.join(evaluation['tasks'])}, one LoRA adapter):"
            f" ours {evaluation['ours_s']:.1f} s, lm-eval's CLI {evaluation['lm_eval_cli_s']:.1f} s (process start,"
            f" task index and model load included), {evaluation['ours_vs_cli']:.2f}×; {scores}.",
        ]
    return "\n".join(lines) + "\n"
