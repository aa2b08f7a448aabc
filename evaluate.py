"""Evaluate a finished run, an adapter dir, or the base model: `python evaluate.py run_dir=runs/x`.

Composes conf/evaluate.yaml (`python evaluate.py --help` lists the groups), then runs
ctrlora.evaluation.cli.evaluate_saved: load backbone (+ adapter) -> lm-eval suite -> JSON.
"""

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


if __name__ == "__main__":
    main()
