"""eval=paper: the six benchmarks through lm-eval on local fixture mirrors, with no network."""

from __future__ import annotations

import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException

from ctrlora.errors import ConfigError, DataError
from ctrlora.evaluation.harness import limit_value, select_metrics
from ctrlora.evaluation.sections import task_rows
from ctrlora.evaluation.suite import evaluate_model
from ctrlora.evaluation.tasks import STOCK_ROOT, write_task_yamls
from evaluation.helpers import FIXTURE_MIRRORS, random_lora, train_config

PAPER_METRICS = {
    "mmlu": ["acc"],
    "gsm8k": ["exact_match,strict-match", "exact_match,flexible-extract"],
    "arc_challenge": ["acc_norm"],
    "hellaswag": ["acc_norm"],
    "boolq": ["acc"],
    "winogrande": ["acc"],
}
PAPER_SHOTS = {"mmlu": 5, "gsm8k": 8, "arc_challenge": 25, "hellaswag": 10, "boolq": 0, "winogrande": 5}
FIXTURE_DOCS = {"mmlu": 3 + 2, "gsm8k": 2, "arc_challenge": 3, "hellaswag": 3, "boolq": 3, "winogrande": 3}


def test_paper_suite_on_fixture_mirrors_reports_every_metric(tiny, tmp_path: Path) -> None:
    _, tokenizer, backbone = tiny
    cfg = train_config(
        [
            "eval=paper",
            f"eval.data_dir={FIXTURE_MIRRORS}",
            "eval.tasks.gsm8k.max_gen_toks=8",
            "eval.base_row=false",
        ],
        tmp_path,
    )
    section = evaluate_model(
        random_lora(backbone), tokenizer, cfg.eval, base_model_key="unused", cache_root=tmp_path
    )

    assert {task: list(metrics) for task, metrics in task_rows(section).items()} == PAPER_METRICS
    for task, metrics in task_rows(section).items():
        for metric, entry in metrics.items():
            assert 0.0 <= entry["value"] <= 1.0, (task, metric)
            assert isinstance(entry["stderr"], float) and entry["stderr"] >= 0.0, (task, metric)
    versions = section["versions"]
    assert versions["lm_eval"] == version("lm_eval") and versions["suite"] == "paper"
    assert versions["num_fewshot"] == PAPER_SHOTS
    assert versions["samples"] == FIXTURE_DOCS  # the mirrors were read, not the hub's data sets
    assert {task: str(v) for task, v in versions["tasks"].items()} == {
        "mmlu": "2",
        "gsm8k": "3.0",
        "arc_challenge": "1.0",
        "hellaswag": "1.0",
        "boolq": "2.0",
        "winogrande": "1.0",
    }
    # every task derives from lm-eval's own YAML and reads the fixture files by absolute path
    boolq = yaml.safe_load((Path(versions["task_dir"]) / "boolq.yaml").read_text())
    assert boolq["include"] == str(STOCK_ROOT / "super_glue" / "boolq" / "default.yaml")
    assert (
        "doc_to_text" not in boolq and boolq["training_split"] is None
    )  # stock prompt; no train split mirrored
    assert boolq["dataset_kwargs"]["data_files"] == {
        "validation": str(FIXTURE_MIRRORS / "boolq" / "validation.jsonl")
    }


def test_command_line_overrides_reach_the_generated_tasks(tmp_path: Path) -> None:
    cfg = train_config(
        [
            "eval=paper",
            f"eval.data_dir={FIXTURE_MIRRORS}",
            "eval.tasks.gsm8k.num_fewshot=0",
            "eval.limit=20",
            "eval.tasks.arc_challenge.limit=0.5",
            "eval.tasks.hellaswag.batch_size=2",
        ],
        tmp_path,
    )
    tasks = write_task_yamls(cfg.eval, tmp_path)
    gsm8k = yaml.safe_load((tasks.directory / "gsm8k.yaml").read_text())
    assert gsm8k["num_fewshot"] == 0
    assert limit_value(cfg.eval.tasks["mmlu"].limit, cfg.eval.limit) == 20
    assert limit_value(cfg.eval.tasks["arc_challenge"].limit, cfg.eval.limit) == 0.5
    assert cfg.eval.tasks["hellaswag"].batch_size == 2
    mmlu = yaml.safe_load((tasks.directory / "mmlu.yaml").read_text())
    assert mmlu["task"] == ["mmlu_astronomy", "mmlu_philosophy"]  # the subjects the mirror holds
    assert mmlu["aggregate_metric_list"] == [{"metric": "acc", "weight_by_size": True}]
    with pytest.raises(ConfigCompositionException):
        train_config(["eval=paper", "eval.tasks.gsm8k.num_fewshots=0"], tmp_path)


def test_a_mirror_without_the_few_shot_split_is_reported(tmp_path: Path) -> None:
    mirrors = tmp_path / "mirrors"
    shutil.copytree(FIXTURE_MIRRORS / "arc_challenge", mirrors / "arc_challenge")
    (mirrors / "arc_challenge" / "train.jsonl").unlink()
    cfg = train_config(
        [
            "eval=paper",
            f"eval.data_dir={mirrors}",
            "~eval.tasks.mmlu",
            "~eval.tasks.gsm8k",
            "~eval.tasks.hellaswag",
            "~eval.tasks.boolq",
            "~eval.tasks.winogrande",
        ],
        tmp_path,
    )
    with pytest.raises(DataError, match="few-shot documents from split 'train'"):
        write_task_yamls(cfg.eval, tmp_path)
    cfg.eval.tasks["arc_challenge"].num_fewshot = 0  # zero-shot reads only the test split
    arc = yaml.safe_load((write_task_yamls(cfg.eval, tmp_path).directory / "arc_challenge.yaml").read_text())
    assert arc["training_split"] is None and arc["validation_split"] is None and "test_split" not in arc


def test_metric_selection_names_what_lm_eval_computed() -> None:
    result = {
        "exact_match,strict-match": 0.25,
        "exact_match_stderr,strict-match": 0.1,
        "acc,none": 0.5,
        "acc_stderr,none": "N/A",
        "alias": "t",
        "sample_len": 4,
    }
    assert select_metrics("t", result, []) == {
        "exact_match,strict-match": {"value": 0.25, "stderr": 0.1},
        "acc": {"value": 0.5, "stderr": None},
    }
    with pytest.raises(ConfigError, match="available: exact_match,strict-match, acc"):
        select_metrics("t", result, ["acc_norm"])
