"""logger=wandb (offline): the run's config, losses, learning rates, the method's scalars, the
allocation table and heatmap, the curvature spectra, the eval table and the sweep group, read back
from the offline run's files; the same numbers in metrics.csv. A resumed run continues its W&B run."""

from __future__ import annotations

import csv
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import compose_config
from wandb.proto import wandb_internal_pb2

from ctrlora.config import LoggerConfig
from ctrlora.methods.base import METHODS
from ctrlora.methods.cg_lora import CgLoraMethod
from ctrlora.run import train
from ctrlora.trainers import build_loggers

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 7-byte file header, records in 32 KiB blocks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The protobuf records of an offline run's `.wandb` file, up to the last one written whole (wandb-core
    may be writing the next one while this reads)."""
    raw = path.read_bytes()
    if len(raw) < 7:
        return
    assert raw[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(raw):
        left = BLOCK - position % BLOCK
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            position += left
            continue
        if position + 7 + length > len(raw):  # a record still being written
            return
        data = raw[position + 7 : position + 7 + length]
        position += 7 + length
        pending = data if kind in (FULL, FIRST) else pending + data
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def items(entries: Any) -> dict[str, Any]:
    """{key: value} of W&B's key/JSON items (a nested key joined with '/')."""
    return {entry.key or "/".join(entry.nested_key): json.loads(entry.value_json) for entry in entries}


def read_offline_run(run_dir: Path, timeout_s: float = 60) -> dict[str, Any]:
    """Config, group, history rows and final summary of the one offline W&B run under `run_dir`.

    wandb-core writes the file in the background; it is complete once it holds the `exit` record.
    """
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while not any(record.WhichOneof("record_type") == "exit" for record in wandb_records(path)):
        assert time.monotonic() < deadline, f"{path} never got its exit record"
        time.sleep(0.2)
    run: dict[str, Any] = {
        "files": path.parent / "files",
        "group": None,
        "config": {},
        "history": [],
        "summary": {},
    }
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["group"] = record.run.run_group
        elif kind == "config":
            run["config"].update(items(record.config.update))
        elif kind == "history":
            run["history"].append(items(record.history.item))
        elif kind == "summary":
            run["summary"].update(items(record.summary.update))
    return run


class LambdaProbe(CgLoraMethod):
    """CG-LoRA that logs a λ schedule through `step_metrics`, as CTR-LoRA does."""

    def extra_loss(self, model: Any, step: int) -> None:
        self.step = step

    def step_metrics(self) -> dict[str, float]:
        return {"lambda": 1.0 / (1 + self.step)}


@pytest.mark.slow
def test_offline_wandb_run_holds_the_run_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, "cg_probe", LambdaProbe)
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-2026")  # what hydra/launcher=local sets for its jobs
    results = train(
        compose_config(
            [
                f"run_dir={tmp_path}",
                "method=cg_lora",
                "method.name=cg_probe",
                "logger=wandb",
                "eval=local",
                "eval.limit=8",
                "trainer.max_steps=4",
                "trainer.checkpoint_every_n_steps=2",
                "trainer.progress_bar=false",
                "calibration.num_samples=32",
            ]
        )
    )
    run = read_offline_run(tmp_path)

    assert run["group"] == "sweep-2026"
    assert run["config"]["method"]["name"] == "cg_probe" and run["config"]["trainer"]["max_steps"] == 4
    with open(tmp_path / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    for key in ("train/loss", "lr-AdamW", "method/lambda"):  # per step, as in metrics.csv
        logged = [row[key] for row in run["history"] if key in row]
        assert (
            logged == pytest.approx([float(row[key]) for row in rows if row.get(key)]) and len(logged) == 4
        ), key
    assert [row["method/lambda"] for row in run["history"] if "method/lambda" in row] == pytest.approx(
        [1, 1 / 2, 1 / 3, 1 / 4]
    )

    tables = {
        key: json.loads((run["files"] / run["summary"][f"{key}/path"]).read_text())
        for key in ("allocation/ranks", "curvature/spectra", "eval/results")
    }
    allocation = json.loads((tmp_path / "allocation.json").read_text())["modules"]
    assert {row[0]: row[1] for row in tables["allocation/ranks"]["data"]} == {
        name: record["rank"] for name, record in allocation.items()
    }
    first = next(iter(allocation))
    assert [row[2] for row in tables["curvature/spectra"]["data"] if row[0] == first] == pytest.approx(
        allocation[first]["sigma"]
    )
    accuracy = results["eval"]["fortune_topics"]["acc"]
    assert tables["eval/results"]["data"] == [
        [
            "fortune_topics",
            "acc",
            accuracy["value"],
            accuracy["stderr"],
            results["eval"]["base"]["fortune_topics"]["acc"]["value"],
        ]
    ]
    for image in ("allocation/rank_heatmap", "train/loss_curve"):
        assert (run["files"] / run["summary"][f"{image}/path"]).stat().st_size > 0, image
    assert run["summary"]["eval/fortune_topics/acc"] == accuracy["value"]
    assert run["summary"]["train/final_loss"] == results["train"]["final_loss"]


def test_resumed_run_continues_the_earlier_attempts_wandb_run(tmp_path: Path) -> None:
    earlier = tmp_path / "wandb" / "offline-run-20260101_000000-abc123"
    earlier.mkdir(parents=True)
    (tmp_path / "wandb" / "latest-run").symlink_to(earlier.name)
    for resume in (True, False):
        _, wandb_logger = build_loggers(LoggerConfig(name="wandb"), tmp_path, "run", {"resume": resume})
        run = wandb_logger.experiment
        assert (run.id == "abc123") is resume
        run.finish()
