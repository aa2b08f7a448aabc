"""A run SIGKILLed at any point and restarted with `resume=true` ends exactly like an uninterrupted one.

Each attempt runs in a forked child (fast: the imports are done) that kills itself with SIGKILL at
a chosen point (`kill_points`). Dropout stays on: its RNG stream must come back from the checkpoint
too. Torch runs single-threaded, so the runs are bitwise comparable and the fork is safe.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from kill_points import kill_after_step, kill_before_results, kill_while_writing_checkpoint
from safetensors.torch import load_file

from ctrlora import report
from ctrlora.checkpoints import checkpoint_step, latest_checkpoint
from ctrlora.errors import RunDirError
from ctrlora.run import train

STEPS = [
    "eval=none",
    "trainer.max_steps=8",
    "trainer.checkpoint_every_n_steps=4",
    "trainer.progress_bar=false",
    "calibration.num_samples=32",
    "optim.lr=5e-3",
]


def killed_attempt(overrides: list[str], arm: Callable[[], None], timeout_s: float = 300) -> None:
    """Run `train` in a forked child armed to SIGKILL itself; assert it really died by SIGKILL."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            arm()
            train(compose_config(overrides))
            code = 2  # finished without being killed
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    while (waited := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the killed attempt hung: {overrides}")
        time.sleep(0.05)
    status = waited[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"exit status {status}"


@pytest.fixture
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


KILL_SEQUENCES = {
    # killed before the first checkpoint, then half-way through writing one, then after training
    "lora": [lambda: kill_after_step(2), lambda: kill_while_writing_checkpoint(8), kill_before_results],
    # killed mid-schedule, between AdaLoRA's rank updates
    "adalora": [lambda: kill_after_step(6)],
    # killed after the refresh of step 6; the checkpoint of step 4 refers to the factors of step 3
    "ctrlora": [lambda: kill_after_step(6)],
}
METHOD_STEPS = {"ctrlora": ["method.ctr.refresh_every=3"]}  # refreshes at steps 3 and 6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "adalora", "ctrlora"])
def test_killed_run_resumes_to_the_uninterrupted_result(
    tmp_path: Path, method: str, single_thread: None
) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    steps = [*STEPS, *METHOD_STEPS.get(method, [])]
    expected = train(compose_config([f"run_dir={full}", f"method={method}", *steps]))

    overrides = [f"run_dir={killed}", f"method={method}", *steps]
    for attempt, arm in enumerate(KILL_SEQUENCES[method]):
        killed_attempt(overrides + (["resume=true"] if attempt else []), arm)
        assert not (killed / "results.json").exists()
        newest = latest_checkpoint(killed / "checkpoints")  # what a resume loads is always complete
        assert newest is None or torch.load(newest, weights_only=False)["global_step"] == checkpoint_step(
            newest
        )
    with pytest.raises(RunDirError, match="resume=true"):  # an unfinished run is never restarted silently
        train(compose_config(overrides))

    newest = torch.load(latest_checkpoint(killed / "checkpoints"), weights_only=False)
    earlier_wall_s = next(state["wall_s"] for key, state in newest["callbacks"].items() if "RunStats" in key)
    resumed = train(compose_config([*overrides, "resume=true"]))
    assert resumed["run"]["wall_s"] > earlier_wall_s > 0  # the killed processes' time counts too
    want = load_file(full / "adapter" / "adapter_model.safetensors")
    got = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert json.loads((killed / "adapter" / "adapter_config.json").read_text()) == json.loads(
        (full / "adapter" / "adapter_config.json").read_text()
    )
    # the whole loss history and the run statistics survive every kill
    assert report.logged_losses(killed) == report.logged_losses(full)
    for key in ("steps", "tokens", "final_loss"):
        assert resumed["train"][key] == expected["train"][key], key
    if method == "ctrlora":  # the refreshes of steps 3 and 6, each recorded once across the kill
        assert [refresh["step"] for refresh in resumed["train"]["curvature"]["refreshes"]] == [3, 6]
