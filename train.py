"""Fine-tune a backbone with a PEFT method: `python train.py method=dora model=llama2-7b`.

Composes conf/train.yaml (see `python train.py --help` for the groups and their choices), then
runs ctrlora.run.train: backbone -> data -> method -> Lightning fit -> adapter -> eval -> report.
"""

import hydra
from omegaconf import DictConfig

from ctrlora.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the validation metric (``eval.val_metric``), the objective of a Hydra sweeper."""
    from ctrlora.evaluation.validation import objective_value
    from ctrlora.run import train

    return objective_value(train(cfg), cfg.eval.val_metric, cfg.model.task)


if __name__ == "__main__":
    main()
