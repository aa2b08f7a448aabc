"""Errors that name what the user must change, and the marker a run dir gets when one stops it."""

import json
from pathlib import Path

FAILED_FILE = "failed.json"  # in a run dir that an input error stopped (a later attempt removes it)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and the valid choices."""


class RunDirError(RuntimeError):
    """The run dir holds a finished run (or no checkpoint to resume from)."""


class DataError(ValueError):
    """A data file is missing or a row is malformed; the message names file, line and field."""


class RunStopped(RuntimeError):
    """A signal (SIGTERM/SIGUSR1) stopped the run at a step boundary, after a checkpoint there."""


def check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise `ConfigError` naming the config key (e.g. ``method.ctr.compose``), the value and the choices."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(choices)}")


def mark_failed(run_dir: str | Path, error: Exception) -> None:
    """Write FAILED_FILE into `run_dir` when it exists (Hydra makes its output dir before a run
    starts) and holds no finished run: what stopped it, for whoever finds the dir."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and not (run_dir / "results.json").exists():
        record = {"error": type(error).__name__, "message": str(error)}
        (run_dir / FAILED_FILE).write_text(json.dumps(record, indent=2) + "\n")
