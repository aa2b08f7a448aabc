"""What a run prints: its phases and step progress, each line once, no library warning a user cannot
act on — while a load report that says something (an unexpected key) still gets through."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT

from ctrlora.console import FreshHeadReport


@pytest.mark.slow
def test_a_run_logs_its_phases_and_progress_once_without_library_noise(tmp_path: Path) -> None:
    command = [
        sys.executable, "train.py", "model=minilm-l6", "method=lora", "trainer.max_steps=4",
        "calibration.head_warmup_steps=2", "calibration.num_samples=16", "eval.limit=16", "data.val_fraction=0.02",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=True)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    messages = [line.split("] - ", 1)[-1] for line in lines]  # without the timestamp
    assert [m for m, count in Counter(messages).items() if count > 1] == []
    assert not [line for line in lines if "Warning" in line or "warn(" in line or "LOAD REPORT" in line]
    for expected in ("loading minilm-l6: done", "scoring the base model", "lora: adapters: done",
                     "step 4/4", "training (4 steps): done", "validation: done"):
        assert any(expected in message for message in messages), expected


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, message, None, None)


def test_only_a_fresh_head_report_is_dropped() -> None:
    fresh = "BertForSequenceClassification LOAD REPORT from: x\nKey | Status |\nclassifier.weight | MISSING |\n"
    other = fresh + "bert.pooler.dense.weight | UNEXPECTED |\n"
    assert not FreshHeadReport().filter(record(fresh))
    assert FreshHeadReport().filter(record(other)) and FreshHeadReport().filter(record("another warning"))
