"""The NLU study (experiments/nlu_minilm): its study file covers every method and CTR-LoRA ablation on both
tasks, and scripts/study.py tunes, selects, runs seeds and aggregates on the real all-MiniLM-L6-v2 encoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from hydra import compose, initialize_config_dir

from ctrlora.errors import ConfigError
from ctrlora.evaluation.aggregate import collect_runs
from ctrlora.evaluation.selection import best_trials, seed_run_overrides
from ctrlora.study import (
    keep_from,
    kept_files,
    load_study,
    pair_finished,
    seed_overrides,
    set_aside_other_settings,
)
from ctrlora.study_report import study_report, tuned_settings


def test_the_study_tunes_every_method_and_ctr_ablation_on_both_tasks_with_one_budget() -> None:
    study = load_study(ROOT / "experiments" / "nlu_minilm" / "study.yaml")
    methods = {item.split("=", 1)[1] for overrides in study.variants.values() for item in overrides if item.startswith("method=")}
    assert methods == {
        "head_only", "lora", "qlora", "adalora", "dora", "pissa", "loraplus", "sensitivity_lora", "cg_lora", "ctrlora", "full_ft",
    }
    ablations = {name: set(o) for name, o in study.variants.items() if "method=ctrlora" in o and name != "ctrlora"}
    assert ablations == {
        "no_trust_region": {"method=ctrlora", "method.ctr.trust_region=false"},
        "uniform": {"method=ctrlora", "method.ctr.allocation=uniform"},
        "neither": {"method=ctrlora", "method.ctr.allocation=uniform", "method.ctr.trust_region=false"},
    }
    assert set(study.tasks) == {"fortune_topics", "wordnet_hypernyms"} and len(study.seeds) >= 5
    assert study.tune_seed not in study.seeds  # the table's seeds are not the one the settings were picked on
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=[f"experiment={study.experiment}", *study.tasks["wordnet_hypernyms"]])
    assert cfg.model.name == "minilm-l6" and cfg.data.val_fraction == 0.1 and cfg.data.text_pair_field == "category"


def test_tune_overrides_leave_the_seed_runs_by_key_and_may_not_share_a_key_with_other_settings(tmp_path: Path) -> None:
    """The seed runs drop every tuning-only key, whatever form the sweeper gave its value; a key set both for
    tuning only and elsewhere is refused (dropping it would silently drop the other setting too)."""
    base = {"out": "runs", "experiment": "nlu_minilm", "trials": 2, "seeds": [1], "tasks": {"t": ["data=fortune_topics"]},
            "variants": {"lora": ["method=lora"]}, "overrides": ["trainer.progress_bar=false"],
            "tune_overrides": ["eval=none", "+trainer.limit_val_batches=0.5", "data.val_fraction=null"]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(base))
    trial = ["optim.lr=0.001", "method=lora", "trainer.progress_bar=False", "eval=none",
             "+trainer.limit_val_batches=0.5", "data.val_fraction=None"]
    assert seed_overrides(load_study(path), trial) == ["optim.lr=0.001", "method=lora", "trainer.progress_bar=False"]
    path.write_text(yaml.safe_dump({**base, "tasks": {"t": ["data=fortune_topics", "eval=local"]}}))
    with pytest.raises(ConfigError, match=r"study.yaml: tune_overrides set \['eval'\]"):
        load_study(path)


def test_the_report_names_the_searched_settings_alone_and_refuses_a_study_that_has_not_run(tmp_path: Path) -> None:
    study = replace(load_study(ROOT / "experiments" / "nlu_minilm" / "study.yaml"), out=tmp_path / "runs")
    selected = ["optim.lr=0.0028769620038000014", "method.ctr.lambda0=10.19701487875909", "method.ctr.lambda_schedule=linear",
                "experiment=nlu_minilm", "data=wordnet_hypernyms", "data.batch_size=32", "method=ctrlora",
                "method.ctr.allocation=uniform", "trainer.progress_bar=False"]
    assert tuned_settings(study, selected) == ["lr 0.0029", "lambda0 10", "lambda_schedule linear"]  # the rest: the study's
    with pytest.raises(ConfigError, match=r"runs/study.json does not exist: the study has not run yet"):
        study_report(study, ROOT)


def test_the_ctr_ablation_preset_sweeps_lambda0_and_schedules_into_one_folder_per_setting() -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["experiment=nlu_minilm_ctr"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params.method == "ctrlora" and params.seed == "0,1,2" and cfg.model.name == "minilm-l6"
    assert params["method.ctr.lambda0"] == "0.02,0.05,0.1,0.2" and params["method.ctr.lambda_schedule"] == "linear,cosine"
    assert cfg.optim.lr == 3e-3 and cfg.trainer.max_steps == 120  # the study's protocol, as nlu_minilm
    assert cfg.hydra.sweep.subdir == "allocation=greedy,trust_region=True,lambda0=0.1,cosine/seed=0"  # the settings


@pytest.mark.slow
def test_a_small_study_tunes_selects_runs_seeds_and_aggregates_one_row_per_variant(tmp_path: Path) -> None:
    """scripts/study.py on the real encoder, a handful of steps: a reference row and a CTR-LoRA ablation
    (its row labelled by its variant), two trials each, one seed; then aggregate and evaluate.py."""
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "out": str(tmp_path / "runs"), "experiment": "nlu_minilm", "trials": 2, "seeds": [1],
        "overrides": ["trainer.progress_bar=false", "trainer.max_steps=3", "calibration.num_samples=16",
                      "calibration.head_warmup_steps=5", "eval.limit=32",
                      "data.val_fraction=0.02"],  # 50 validation rows, not 250: the test's time
        "tune_overrides": ["eval=none"],
        "tasks": {"fortune_topics": ["data=fortune_topics"]},
        "variants": {"head_only": ["method=head_only"], "uniform": ["method=ctrlora", "method.ctr.allocation=uniform"]},
    }))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "scripts/study.py", str(study)]
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    record = json.loads((tmp_path / "runs" / "study.json").read_text())
    pairs = {pair["variant"]: pair for pair in record["pairs"]}
    assert set(pairs) == {"head_only", "uniform"} and all("error" not in pair for pair in pairs.values())
    for variant, pair in pairs.items():
        trials = list((tmp_path / "runs" / "tune" / "fortune_topics" / variant).rglob("results.json"))
        best = max(trials, key=lambda path: json.loads(path.read_text())["val"]["accuracy"])
        assert len(trials) == 2 and pair["val"] == json.loads(best.read_text())["val"]["accuracy"]
        assert all(not json.loads(path.read_text())["eval"] for path in trials)  # tune_overrides: no test scores
        assert "eval=none" not in pair["overrides"]  # the seed runs score the test split
        assert json.loads((tmp_path / "runs" / "seeds" / "fortune_topics" / variant / "seed=1" / "results.json").read_text())["eval"]
        seed_run = tmp_path / "runs" / "seeds" / "fortune_topics" / variant / "seed=1"
        config = yaml.safe_load((seed_run / "config.yaml").read_text())
        tuned = [item for item in pair["overrides"] if item.startswith("optim.lr=")]
        assert config["seed"] == 1 and tuned and config["optim"]["lr"] == float(tuned[0].split("=")[1])

    # git keeps what the table, the selection and resume=true read, were these runs under experiments/ (.gitignore)
    written = [path.relative_to(tmp_path / "runs") for path in (tmp_path / "runs").rglob("*") if path.is_file()]
    kept = kept_files(tmp_path / "runs", Path("experiments/nlu_minilm/runs"), ROOT)
    ignored = set(written) - set(kept)
    assert {path.name for path in kept} == {
        "study.json", "results.json", "config.yaml", "summary.md", "overrides.yaml", "metrics.csv", "allocation.json"}
    assert any(path.suffix == ".ckpt" for path in written) and all(
        path in ignored for path in written if str(path).endswith((".ckpt", ".safetensors", ".log", "hydra.yaml")))
    clone = tmp_path / "clone"  # the kept files alone select the same trials and make the same table
    assert keep_from(tmp_path / "runs", clone, Path("experiments/nlu_minilm/runs"), ROOT) == len(kept)
    assert not any(str(tmp_path) in (clone / path).read_text() for path in kept)  # no machine's paths in git
    for variant in pairs:
        ((trial, _),) = best_trials(clone / "tune" / "fortune_topics" / variant).values()
        assert seed_overrides(load_study(study), seed_run_overrides(trial)) == pairs[variant]["overrides"]
    assert len(collect_runs(clone / "seeds", variants=True)) == len(collect_runs(tmp_path / "runs" / "seeds", variants=True)) == 2

    again = subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=600)
    assert again.stdout.count("(finished earlier)") == 2  # a rerun enters no finished pair again
    assert len(json.loads((tmp_path / "runs" / "study.json").read_text())["invocations"]) == 2

    report = subprocess.run([*command, "--report"], cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    for line, variant in zip(report.splitlines()[2:4], ["head_only", "uniform"], strict=True):  # the study file's order
        (lr,) = [float(item.split("=")[1]) for item in pairs[variant]["overrides"] if item.startswith("optim.lr=")]
        assert line.startswith(f"| {variant} | fortune_topics | lr {lr:.2g}") and f"| {pairs[variant]['val']:.3f} | 2 |" in line
        assert ("lambda0" in line) == (variant == "uniform")  # λ₀ searched with the trust region; the fixed keys left out
        result = json.loads((tmp_path / "runs" / "seeds" / "fortune_topics" / variant / "seed=1" / "results.json").read_text())
        assert line.endswith(f"| 1, {result['run']['wall_s'] / 3600:.2f} |")  # one seed run, its recorded wall time
    walls = [json.loads(path.read_text())["run"]["wall_s"] for path in (tmp_path / "runs").rglob("results.json")]
    assert f"2 of 2 (variant, task) pairs selected; 6 runs, {sum(walls) / 3600:.1f} h of run time" in report

    seeds = tmp_path / "runs" / "seeds"
    aggregate = [sys.executable, "scripts/aggregate.py", str(seeds), "--variants"]
    table = subprocess.run(aggregate, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert "fortune_topics (accuracy)" in rows[0]
    labels = [row.split("|")[1] for row in rows[1:]]
    assert [label.split(" ⚠")[0].split(" (limited")[0].strip() for label in labels] == [
        "base", "head_only", "ctrlora (uniform)",  # base: the frozen encoder and warmed head, before adaptation
    ]
    assert all("(limited eval in 1/1 seeds)" in label for label in labels[1:])  # eval.limit=32: marked
    head_only = rows[2].split("|")
    assert head_only[2].strip() == "–" and head_only[3].strip() == "3,080"  # no budget; 384·8 + 8 head weights
    # the rank heatmap from the allocation.json the ablation's run wrote (36 projections at r̄ = 8)
    allocation = json.loads((seeds / "fortune_topics" / "uniform" / "seed=1" / "allocation.json").read_text())
    assert len(allocation["modules"]) == 36
    assert [path.name for path in (seeds / "aggregate").glob("ranks-*.png")] == ["ranks-minilm-l6-ctrlora_uniform_-r8.png"]

    head_only_dir = seeds / "fortune_topics" / "head_only" / "seed=1"  # evaluate.py reloads the saved model
    recorded = json.loads((head_only_dir / "results.json").read_text())["eval"]["fortune_topics"]
    evaluate = [sys.executable, "evaluate.py", f"run_dir={head_only_dir}"]
    printed = subprocess.run(evaluate, cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=300).stdout
    again = json.loads((head_only_dir / "results.json").read_text())["eval"]["fortune_topics"]
    assert again["accuracy"]["value"] == recorded["accuracy"]["value"]
    assert json.loads(printed)["fortune_topics"] == again  # stdout is the JSON alone
    limited = [*evaluate, "eval.limit=8"]  # a smaller part of the test split: its own file, results.json kept
    subprocess.run(limited, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    assert json.loads((head_only_dir / "results.json").read_text())["eval"]["fortune_topics"] == again
    assert json.loads((head_only_dir / "eval_limited.json").read_text())["versions"]["samples"]["fortune_topics"] == 8

    # a larger trial budget re-enters every pair; where it selects other settings, the old seed runs move aside
    bigger = replace(load_study(study), trials=3)
    assert not pair_finished(bigger, pairs["head_only"]) and pair_finished(load_study(study), pairs["head_only"])
    selected = pairs["head_only"]["overrides"]
    assert set_aside_other_settings(bigger, "fortune_topics", "head_only", selected) is None  # the same settings
    other = [item if not item.startswith("optim.lr=") else "optim.lr=0.5" for item in selected]
    moved = set_aside_other_settings(bigger, "fortune_topics", "head_only", other)
    assert moved is not None and moved.parent == tmp_path / "runs" / "superseded" / "fortune_topics" / "head_only"
    assert (moved / "seed=1" / "results.json").exists() and not head_only_dir.exists()
