"""`hydra/sweeper=optuna`: Hydra's Optuna sweeper searching the chosen method's own space.

Each method config declares what is tuned for it in ``method.search`` (Optuna's override grammar,
e.g. ``optim.lr: tag(log, interval(1e-5, 1e-2))``): the learning rate for every method, plus λ₀ for
CTR-LoRA and the η scale for CG-LoRA (docs/EVALUATION.md §4.1). A sweeper's parameters live in the Hydra
config, which cannot interpolate the job's ``method`` node, so this sweeper reads them once the
whole config is composed: ``method.search``, then any ``hydra.sweeper.params`` given explicitly
(which win). Everything else — seeded TPE, trials, directions, launchers — is Optuna's sweeper.

    python train.py -m hydra/sweeper=optuna method=ctrlora      # + hydra/launcher=slurm on a cluster
    python scripts/select_best.py multirun/<sweep dir>               # the best trial -> overrides + seed runs

Each trial's objective is what train.py returns: ``eval.val_metric`` on the validation split
(maximized for the classifier metrics, minimized for a loss); test scores are never read.

The config takes the plugin's own option name, ``optuna``, with the plugin's fields and ctrlora's
defaults: seeded TPE (seed 0, 4 random start-up trials), 16 trials (8 left two-dimensional spaces
under-searched: experiments/nlu_minilm/README.md), one at a time, a failed trial recorded as failed
rather than ending the search. A file
``conf/hydra/sweeper/optuna.yaml`` cannot do it (Hydra refuses a file named like a ConfigStore
schema that has a defaults list), so `register_sweeper_config` stores the node in the ConfigStore
— after Hydra's plugin scan, which re-executes every plugin module, the plugin's config with its
own ``optuna`` entry among them (`ctrlora.config.register_configs` runs the scan first). No
postponed annotations here: the scan executes this module outside sys.modules, where dataclasses
need them.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf


class MethodSearchSweeper(OptunaSweeper):
    """`OptunaSweeper` whose search space starts from the composed config's ``method.search``."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        explicit = OmegaConf.to_container(self.sweeper.params) if self.sweeper.params else {}
        self.sweeper.params = OmegaConf.create({**OmegaConf.to_container(config.method.search), **explicit})


@dataclass
class MethodSearchSweeperConf(OptunaSweeperConf):
    """The plugin's `OptunaSweeperConf` with `MethodSearchSweeper` and ctrlora's defaults."""

    _target_: str = "hydra_plugins.ctrlora_launchers.search.MethodSearchSweeper"
    sampler: Any = field(default_factory=lambda: {"seed": 0, "n_startup_trials": 4})  # onto the `tpe` default
    direction: Any = "${val_direction:${eval.val_metric},${model.task}}"
    study_name: str | None = "${model.name}-${method.name}-${data.name}"
    n_trials: int = 16
    n_jobs: int = 1
    # A trial whose run fails (a learning rate at the top of the range can diverge: the run stops on a
    # non-finite loss) is told to Optuna as failed, and the search goes on; the plugin's 0.0 would end it.
    max_failure_rate: float = 1.0


def register_sweeper_config() -> None:
    """Store `MethodSearchSweeperConf` as ``hydra/sweeper=optuna`` (call after Hydra's plugin scan)."""
    ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=MethodSearchSweeperConf, provider="ctrlora")
