"""Evaluate a finished run, an adapter dir, or the base model: `python evaluate.py run_dir=runs/x`.

Composes conf/evaluate.yaml (`python evaluate.py --help` lists the groups), then runs
ctrlora.evaluation.cli.evaluate_saved: load backbone (+ adapter) -> lm-eval suite -> JSON.
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from ctrlora.config import register_configs
from ctrlora.evaluation.cli import register_evaluate_config

register_configs()
register_evaluate_config()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from ctrlora.evaluation.cli import evaluate_saved

    evaluate_saved(OmegaConf.to_object(cfg))


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
