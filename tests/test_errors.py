"""Bad input gets a clear error naming what to change, and nothing half-written (one test per case)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST, compose_config
from hydra.errors import HydraException

from ctrlora.errors import ConfigError, DataError, RunDirError
from ctrlora.run import train


def test_unknown_method_lists_the_choices() -> None:
    with pytest.raises(HydraException, match=r"(?s)Could not find 'method/lorra'.*Available options in 'method'.*dora.*lora"):
        compose_config(["method=lorra", "run_dir=x"])


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(HydraException, match=r"(?s)Could not find 'model/llama-7b'.*llama2-7b.*tiny-llama"):
        compose_config(["model=llama-7b", "run_dir=x"])


def test_unknown_key_names_key_and_schema() -> None:
    with pytest.raises(HydraException, match=r"Could not override 'method.alpah'"):
        compose_config(["method.alpah=8", "run_dir=x"])


def test_added_unknown_key_lists_the_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'method.alpah'; valid keys here: .*alpha"):
        train(compose_config(["+method.alpah=8", f"run_dir={tmp_path}", *FAST]))
    assert not any(tmp_path.iterdir())


def test_budget_giving_rank_zero(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"budget.ratio=1e-06 gives rank 0"):
        train(compose_config(["budget.ratio=1e-6", "budget.rank=null", f"run_dir={tmp_path}", *FAST]))
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "adapter").exists()


def test_missing_data_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.train.*no_such_file.jsonl"):
        train(compose_config(["data.train=no_such_file.jsonl", f"run_dir={tmp_path}", *FAST]))
    assert not (tmp_path / "results.json").exists()


def test_malformed_row_names_file_line_and_field(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    rows = [{"text": "a fine quotation", "label": "law"}, {"text": "another one", "label": "food"}, {"txt": "x", "label": "law"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"bad.jsonl line 3: field 'text'"):
        train(compose_config([f"data.train={data}", "data.test=null", f"run_dir={tmp_path / 'run'}", *FAST]))


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "broken.jsonl"
    data.write_text('{"text": "fine", "label": "law"}\n{"text": "unterminated\n')
    with pytest.raises(DataError, match=r"broken.jsonl line 2"):
        train(compose_config([f"data.train={data}", "data.test=null", f"run_dir={tmp_path / 'run'}", *FAST]))


def test_hub_model_without_local_copy_says_to_set_model_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model 'llama2-7b'.*no local copy.*model.path="):
        train(compose_config(["model=llama2-7b", f"run_dir={tmp_path}", *FAST]))


def test_nonpositive_max_steps(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.max_steps=0 must be > 0"):
        train(compose_config([f"run_dir={tmp_path}", *FAST, "trainer.max_steps=0"]))
    assert not any(tmp_path.iterdir())


def test_finished_run_is_not_overwritten_silently(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text('{"run": {"method": "lora"}}')
    with pytest.raises(RunDirError, match=r"already holds a finished run.*overwrite=true"):
        train(compose_config([f"run_dir={tmp_path}", *FAST]))
    assert results.read_text() == '{"run": {"method": "lora"}}'


def test_head_warmup_without_a_fresh_head_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"calibration.head_warmup_steps=5 trains a fresh head, but model=tiny-llama"):
        train(compose_config([f"run_dir={tmp_path}", *FAST, "calibration.head_warmup_steps=5"]))
    assert not any(tmp_path.iterdir())
