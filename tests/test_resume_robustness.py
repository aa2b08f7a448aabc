"""Resume survives what the kill tests do not cover: a corrupt newest checkpoint (the previous one is
kept and used), a run shorter than the checkpoint interval, and SIGTERM (a checkpoint at the next
step boundary, then a clean stop) — each ends with the uninterrupted run's adapter."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from kill_points import kill_after_step, kill_before_results
from safetensors.torch import load_file
from test_kill_resume import STEPS, killed_attempt, single_thread  # noqa: F401  (a fixture)

from ctrlora.checkpoints import SignalCheckpoint, checkpoint_step
from ctrlora.errors import ConfigError, RunDirError, RunStopped
from ctrlora.lit import FinetuneModule
from ctrlora.run import train


def same_adapter(a: Path, b: Path) -> bool:
    want, got = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    return want.keys() == got.keys() and all(torch.equal(want[key], got[key]) for key in want)


def steps_on_disk(run_dir: Path) -> list[int]:
    return sorted(step for path in (run_dir / "checkpoints").iterdir() if (step := checkpoint_step(path)) is not None)


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, single_thread: None, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(compose_config([f"run_dir={full}", "method=lora", *STEPS]))
    overrides = [f"run_dir={killed}", "method=lora", *STEPS]
    killed_attempt(overrides, kill_before_results)  # trained to step 8, no results.json
    assert steps_on_disk(killed) == [4, 8]  # the previous checkpoint is kept beside the newest
    newest = killed / "checkpoints" / "step000008.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a bad copy
    with caplog.at_level(logging.WARNING, logger="ctrlora.checkpoints"):
        train(compose_config([*overrides, "resume=true"]))
    assert "step000008.ckpt does not open" in caplog.text
    assert same_adapter(full, killed)


@pytest.mark.slow
def test_a_run_shorter_than_the_checkpoint_interval_resumes(tmp_path: Path, single_thread: None) -> None:  # noqa: F811
    short = [*STEPS, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=50"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(compose_config([f"run_dir={full}", "method=lora", *short]))
    overrides = [f"run_dir={killed}", "method=lora", *short]
    killed_attempt(overrides, lambda: kill_after_step(3))
    assert steps_on_disk(killed) == [2]  # every half run at most
    train(compose_config([*overrides, "resume=true"]))
    assert same_adapter(full, killed)


def test_sigterm_checkpoints_at_the_next_step_and_resume_finishes_the_run(
    tmp_path: Path, single_thread: None, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train(compose_config([f"run_dir={full}", "method=lora", *STEPS]))

    def sigterm_at_step_5(self: FinetuneModule, *args: object) -> None:
        if self.global_step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    overrides = [f"run_dir={stopped}", "method=lora", *STEPS]
    with monkeypatch.context() as patch:
        patch.setattr(FinetuneModule, "on_train_batch_end", sigterm_at_step_5, raising=False)
        with pytest.raises(RunStopped, match="SIGTERM stopped the run after step 6 .* resume=true"):
            train(compose_config(overrides))
    assert steps_on_disk(stopped) == [4, 6] and not (stopped / "results.json").exists()
    handler = signal.getsignal(signal.SIGTERM)
    assert type(getattr(handler, "__self__", None)).__name__ != "SignalCheckpoint"  # handed back
    train(compose_config([*overrides, "resume=true"]))
    assert same_adapter(full, stopped)


def test_a_stopped_slurm_job_is_requeued_by_scontrol_or_by_submitits_own_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain sbatch: SIGUSR1 ends in `scontrol requeue $SLURM_JOB_ID` (a stand-in scontrol records its
    arguments). Under submitit, the handler it installed gets the signal."""
    calls = tmp_path / "scontrol-calls"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")

    def stopped_by(signum: int) -> SignalCheckpoint:
        stop = SignalCheckpoint(tmp_path)
        stop.on_train_start(None, None)  # type: ignore[arg-type]
        os.kill(os.getpid(), signum)
        stop.on_train_end(None, None)  # type: ignore[arg-type]
        return stop

    assert stopped_by(signal.SIGUSR1).pass_on() == "; SLURM job 4242 requeued"
    assert calls.read_text() == "requeue 4242\n"
    received: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, _: received.append(signum))
    try:
        assert stopped_by(signal.SIGUSR2).pass_on() == "" and received == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls.read_text() == "requeue 4242\n"  # submitit's handler requeues; scontrol is not called again


def test_resume_refuses_a_run_dir_that_ran_other_settings(tmp_path: Path, single_thread: None) -> None:  # noqa: F811
    """A study whose selected settings changed must not get the old runs back as if they were the new ones."""
    run_dir = tmp_path / "run"
    short = [f"run_dir={run_dir}", "method=lora", *STEPS, "trainer.max_steps=2"]
    finished = train(compose_config(short))
    again = train(compose_config([*short, "resume=true", "trainer.progress_bar=false"]))  # reporting keys may change
    assert again == finished
    with pytest.raises(RunDirError, match=r"changed: optim\.lr, seed\b"):
        train(compose_config([*short, "resume=true", "optim.lr=0.05", "seed=3"]))
    saved = run_dir / "config.yaml"  # as a later version would find it: a key this version does not have
    saved.write_text(saved.read_text().replace("optim:\n", "optim:\n  momentum: 0.9\n", 1))
    with pytest.raises(ConfigError, match=r"config\.yaml does not load with this version of ctrlora: unknown key 'optim\.momentum'"):
        train(compose_config([*short, "resume=true"]))
