"""Evaluate a finished run, an adapter dir, or the base model: `python evaluate.py run_dir=runs/x`.

Composes conf/evaluate.yaml (`python evaluate.py --help` lists the groups), then runs
ctrlora.evaluation.cli.evaluate_saved: load backbone (+ adapter) -> lm-eval suite -> JSON. Only
that JSON goes to stdout (`python evaluate.py ... > eval.json` is valid JSON): while it works,
file descriptor 1 points at stderr, so libraries' log lines and bars cannot reach stdout.
"""

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ctrlora.config import register_configs
from ctrlora.evaluation.cli import register_evaluate_config

register_configs()
register_evaluate_config()


@contextmanager
def stdout_on_stderr() -> Iterator[None]:
    """Point file descriptor 1 (and sys.stdout) at stderr for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from ctrlora.evaluation.cli import evaluate_saved

    with stdout_on_stderr():
        section = evaluate_saved(OmegaConf.to_object(cfg))
    text = json.dumps(section, indent=2) + "\n"
    if cfg.output:
        Path(cfg.output).write_text(text)
    else:
        sys.stdout.write(text)


def quote_paths(argv: list[str]) -> list[str]:
    """Quote the value of run_dir=/adapter=/output=: sweep dirs hold '=' and ',' (`seed=0,...`),
    which Hydra's override grammar would otherwise parse."""
    keys = ("run_dir=", "adapter=", "output=")
    return [
        f"{arg.split('=', 1)[0]}='{arg.split('=', 1)[1]}'"
        if arg.startswith(keys) and "'" not in arg and '"' not in arg
        else arg
        for arg in argv
    ]


if __name__ == "__main__":
    sys.argv[1:] = quote_paths(sys.argv[1:])
    main()
