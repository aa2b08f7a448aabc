"""scripts/aggregate.py on hand-written results files: means, sample stds, ordering, bold, files."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest
from conftest import ROOT

STRICT, FLEX = "exact_match,strict-match", "exact_match,flexible-extract"
BASE = {"mmlu": 0.25, STRICT: 0.05, FLEX: 0.10}
RUNS = {  # (method, seed): (mmlu acc, strict, flexible)
    ("lora", 0): (0.30, 0.10, 0.20),
    ("lora", 1): (0.34, 0.14, 0.22),
    ("lora", 2): (0.32, 0.12, 0.24),
    ("ctrlora", 0): (0.40, 0.10, 0.30),
    ("ctrlora", 1): (0.36, 0.16, 0.26),
    ("dora", 0): (0.33, 0.20, 0.21),
}
def write_results(path: Path, method: str, seed: int, scores: tuple[float, float, float] | None) -> None:
    entry = lambda value: {"value": value, "stderr": 0.01}  # noqa: E731
    section = (
        {}
        if scores is None
        else {
            "mmlu": {"acc": entry(scores[0])},
            "gsm8k": {STRICT: entry(scores[1]), FLEX: entry(scores[2])},
            "base": {
                "mmlu": {"acc": entry(BASE["mmlu"])},
                "gsm8k": {STRICT: entry(BASE[STRICT]), FLEX: entry(BASE[FLEX])},
            },
            "versions": {"lm_eval": "0.4.13"},
        }
    )
    budget = {"rank": 8, "ratio": None, "trainable_params": 16384}
    path.mkdir(parents=True)
    results = {
        "run": {"method": method, "model": "tiny-llama", "seed": seed, "budget": budget},
        "eval": section,
    }
    (path / "results.json").write_text(json.dumps(results))


def load_script():
    spec = importlib.util.spec_from_file_location("aggregate_script", ROOT / "scripts" / "aggregate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_aggregate_table_statistics_order_and_outputs(tmp_path: Path) -> None:
    for (method, seed), scores in RUNS.items():
        write_results(tmp_path / method / f"seed{seed}", method, seed, scores)
    write_results(tmp_path / "lora" / "unevaluated", "lora", 9, None)  # eval=none: left out

    assert load_script().main([str(tmp_path)]) == 0
    out = tmp_path / "aggregate"
    main_table, paired_table = (out / "results.md").read_text().split("Paired difference to lora")
    lines = main_table.splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    header = next(line for line in lines if line.startswith("| method"))
    assert header == (
        "| method | budget | trainable params | seeds | mmlu | gsm8k (strict-match) "
        "| gsm8k (flexible-extract) | avg |"
    )
    # hand-computed: sample std with n - 1; avg = per-run mean over the 3 columns, then mean ± std
    assert rows == [
        "| base | – | – | – | 25.0 | 5.0 | 10.0 | 13.3 |",
        "| lora | r=8 | 16,384 | 3 | 32.0 ± 2.0 | 12.0 ± 2.0 | 22.0 ± 2.0 | 22.0 ± 1.8 |",
        "| dora | r=8 | 16,384 | 1 | 33.0 | **20.0** | 21.0 | 24.7 |",
        "| ctrlora | r=8 | 16,384 | 2 | **38.0 ± 2.8** | 13.0 ± 4.2 | **28.0 ± 2.8** | **26.3 ± 0.5** |",
    ]
    # per seed shared with LoRA, method − LoRA; t_{0.975, 1} = 12.706 for two seeds
    assert [line for line in paired_table.splitlines() if line.startswith("| ") and "method" not in line] == [
        "| dora | r=8 | +3.0 (n=1) | +10.0 (n=1) | +1.0 (n=1) |",
        "| ctrlora | r=8 | +6.0 [-44.8, +56.8] (n=2) | +1.0 [-11.7, +13.7] (n=2) | +7.0 [-31.1, +45.1] (n=2) |",
    ]
    with open(out / "results.csv") as file:
        table = {row["method"]: row for row in csv.DictReader(file)}
    assert list(table) == ["base", "lora", "dora", "ctrlora"]
    assert float(table["lora"]["mmlu mean"]) == pytest.approx(0.32)
    assert float(table["lora"]["mmlu std"]) == pytest.approx(0.02)
    assert float(table["lora"]["avg std"]) == pytest.approx(
        ((0.02**2 + (0.4 / 30) ** 2 + (0.2 / 30) ** 2) / 2) ** 0.5
    )
    assert float(table["ctrlora"]["gsm8k (strict-match) std"]) == pytest.approx(0.06 / 2**0.5)
    assert table["dora"]["mmlu std"] == "" and table["dora"]["seeds"] == "1"
    assert (out / "budget_accuracy-tiny-llama.png").stat().st_size > 0
    assert not list(out.glob("ranks-*.png"))  # no run here wrote an allocation.json (a real one: test_nlu_study)


def test_aggregate_logs_the_same_table_to_wandb_offline(tmp_path: Path) -> None:
    for (method, seed), scores in RUNS.items():
        write_results(tmp_path / "runs" / method / f"seed{seed}", method, seed, scores)
    assert load_script().main([str(tmp_path / "runs"), "--wandb", "--project", "ctrlora-test"]) == 0
    logged = sorted(
        Path(os.environ["WANDB_DIR"]).glob("wandb/offline-run-*/files/media/table/results/tiny-llama*.json")
    )
    table = json.loads(logged[-1].read_text())
    with open(tmp_path / "runs" / "aggregate" / "results.csv") as file:
        written = list(csv.reader(file))
    assert table["columns"] == written[0]
    assert [row[1] for row in table["data"]] == ["base", "lora", "dora", "ctrlora"]
    assert table["data"][1][5:7] == pytest.approx([0.32, 0.02])  # lora: mmlu mean, std


def test_variants_make_one_row_per_folder_with_seeds_merged(tmp_path: Path) -> None:
    from ctrlora.evaluation.aggregate import build_tables, collect_runs

    for folder, seed, scores in [("lambda0=0", 0, (0.3, 0.1, 0.2)), ("lambda0=0", 1, (0.5, 0.1, 0.2)),
                                 ("lambda0=0.1", 0, (0.4, 0.1, 0.2))]:
        write_results(tmp_path / "ctr" / folder / f"seed={seed}", "ctrlora", seed, scores)
    assert {record.method for record in collect_runs(tmp_path)} == {"ctrlora"}
    rows = {row.method: row for row in build_tables(collect_runs(tmp_path, variants=True))[0].rows}
    assert set(rows) == {"base", "ctrlora (ctr/lambda0=0)", "ctrlora (ctr/lambda0=0.1)"}
    cell = rows["ctrlora (ctr/lambda0=0)"].cells[("mmlu", "acc")]
    assert cell.n == 2 and cell.mean == pytest.approx(0.4)


def test_paired_with_adds_a_paired_table_per_named_row(tmp_path: Path) -> None:
    """``--paired-with lora,dora``: after the table, the differences to LoRA, then to DoRA (the only seed
    DoRA shares with ctrlora is seed 0, so one difference, n=1)."""
    for (method, seed), scores in RUNS.items():
        write_results(tmp_path / method / f"seed{seed}", method, seed, scores)
    assert load_script().main([str(tmp_path), "--paired-with", "lora,dora"]) == 0
    text = (tmp_path / "aggregate" / "results.md").read_text()
    to_lora, to_dora = text.split("Paired difference to lora")[1].split("Paired difference to dora")
    assert "| ctrlora | r=8 | +6.0 [-44.8, +56.8] (n=2) |" in to_lora
    assert load_script().main([str(tmp_path), "--paired-with", "lora,qlora"]) == 2  # no such row: refused
    rows = [line for line in to_dora.splitlines() if line.startswith("| ") and "method" not in line]
    assert rows == ["| lora | r=8 | -3.0 (n=1) | -10.0 (n=1) | -1.0 (n=1) |",  # seed 0: 30 - 33, 10 - 20, 20 - 21
                    "| ctrlora | r=8 | +7.0 (n=1) | -10.0 (n=1) | +9.0 (n=1) |"]


def test_metrics_keeps_the_named_metrics_columns_alone(tmp_path: Path) -> None:
    for (method, seed), scores in RUNS.items():
        write_results(tmp_path / method / f"seed{seed}", method, seed, scores)
    assert load_script().main([str(tmp_path), "--metrics", "acc"]) == 0
    lines = (tmp_path / "aggregate" / "results.md").read_text().splitlines()
    assert "| method | budget | trainable params | seeds | mmlu | avg |" in lines
    assert "| base | – | – | – | 25.0 | 25.0 |" in lines  # the base row: its mmlu score alone
    assert "| ctrlora | r=8 | +6.0 [-44.8, +56.8] (n=2) |" in lines  # its paired table: the mmlu column alone
    assert load_script().main([str(tmp_path), "--metrics", "accuracy"]) == 2  # no run reports it: refused


def test_the_paired_interval_is_the_hand_computed_t_interval() -> None:
    from ctrlora.evaluation.aggregate import paired_difference

    method = {0: 0.71, 1: 0.74, 2: 0.69, 3: 0.73, 4: 0.70, 7: 0.99}  # seed 7 has no LoRA partner: left out
    lora = {0: 0.70, 1: 0.71, 2: 0.70, 3: 0.70, 4: 0.68}
    differences = [0.01, 0.03, -0.01, 0.03, 0.02]
    mean = sum(differences) / 5
    sd = (sum((d - mean) ** 2 for d in differences) / 4) ** 0.5
    result = paired_difference(method, lora)
    assert result.n == 5 and result.mean == pytest.approx(mean)
    assert result.half_width == pytest.approx(2.7764451 * sd / 5**0.5, rel=1e-6)  # t_{0.975, 4} from a t table


def test_single_class_predictors_are_flagged(tmp_path: Path) -> None:
    from ctrlora.evaluation.aggregate import build_tables, collect_runs, markdown_table

    for seed, classes in enumerate([1, 8, 1]):
        path = tmp_path / f"seed{seed}"
        path.mkdir()
        metrics = {"accuracy": {"value": 0.3, "stderr": 0.01}, "predicted_classes": {"value": classes, "stderr": None}}
        run = {"method": "loraplus", "model": "minilm-l6", "seed": seed, "budget": {"rank": 8}}
        (path / "results.json").write_text(json.dumps({"run": run, "eval": {"topics": metrics}}))
    table = build_tables(collect_runs(tmp_path))[0]
    assert table.columns == [("topics", "accuracy")]  # the class count is a diagnostic, not a column
    assert "| loraplus ⚠ one class in 2/3 seeds | r=8 |" in markdown_table(table)


def test_runs_of_one_task_each_get_no_average_and_no_budget_plot(tmp_path: Path) -> None:
    """A study that trains one run per task: no run holds every column, so no row has an average, and the
    budget–accuracy plot (of the average) is not drawn, nor warned about, rather than drawn empty; the
    tasks' heads differ in size, so the row gives its runs' range of trainable parameters."""
    import warnings

    for task, params in (("topics", 12), ("pairs", 10)):
        path = tmp_path / task / "lora" / "seed=1"
        path.mkdir(parents=True)
        run = {"method": "lora", "model": "minilm-l6", "seed": 1, "budget": {"rank": 8, "trainable_params": params}}
        (path / "results.json").write_text(json.dumps({"run": run, "eval": {task: {"accuracy": {"value": 0.7}}}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_script().main([str(tmp_path)]) == 0
    row = next(line for line in (tmp_path / "aggregate" / "results.md").read_text().splitlines() if line.startswith("| lora"))
    assert row == "| lora | r=8 | 10–12 | 2 | **70.0** | **70.0** | – |"
    assert not list((tmp_path / "aggregate").glob("budget_accuracy-*.png"))
