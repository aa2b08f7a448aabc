"""Fine-tune a backbone with a PEFT method: `python train.py method=dora model=llama2-7b`.

Composes conf/train.yaml (see `python train.py --help` for the groups and their choices), then
runs ctrlora.run.train: backbone -> data -> method -> Lightning fit -> adapter -> eval -> report.
"""

import contextlib
import os
import sys

import hydra
from omegaconf import DictConfig

from ctrlora.config import TrainConfig, apply_offline, method_schema, register_configs, validate_config
from ctrlora.environment import check_environment
from ctrlora.errors import ConfigError, DataError, RunDirError, RunStopped, mark_failed
from ctrlora.override_keys import unknown_override_keys
from ctrlora.storage import storage_error

register_configs()
EXIT_CODES = {ConfigError: 2, DataError: 2, RunDirError: 2, RunStopped: 75}  # 75: temporary, run it again


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the validation metric (``eval.val_metric``), the objective of a Hydra sweeper. An error
    in the input, a full or unwritable disk, or a signal that stopped the run prints one line and
    exits with EXIT_CODES; the traceback only with HYDRA_FULL_ERROR=1."""
    from ctrlora.console import quiet_libraries

    apply_offline(cfg.offline)  # both before the libraries below load
    quiet_libraries()
    try:
        validate_config(cfg)  # before the training stack's imports (~8 s): bad input is refused in seconds
        check_environment(cfg)
        from ctrlora.evaluation.validation import objective_value
        from ctrlora.run import train

        return objective_value(train(cfg, checked=True), cfg.eval.val_metric, cfg.model.task)
    except Exception as raised:  # noqa: BLE001 - re-raised below unless an input, disk or stop error
        error = raised if isinstance(raised, tuple(EXIT_CODES)) else storage_error(raised, cfg.run_dir)
        if error is None:
            raise
        if not isinstance(error, RunStopped):
            with contextlib.suppress(OSError):  # on a full disk the marker may not fit either
                mark_failed(cfg.run_dir, error)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(next(code for kind, code in EXIT_CODES.items() if isinstance(error, kind)))


if __name__ == "__main__":
    try:  # before Hydra, whose own refusal names no valid key
        unknown_override_keys(sys.argv[1:], TrainConfig, {"method": method_schema})
    except ConfigError as error:
        print(f"ConfigError: {error}", file=sys.stderr)
        sys.exit(2)
    main()
