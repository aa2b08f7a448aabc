"""`hydra/sweeper=tpe`: Hydra's Optuna sweeper searching the chosen method's own space.

Each method config declares what is tuned for it in ``method.search`` (Optuna's override grammar,
e.g. ``optim.lr: tag(log, interval(1e-5, 1e-2))``): the learning rate for every method, plus λ₀ for
CTR-LoRA and the η scale for CG-LoRA (EVALUATION §4.1). A sweeper's parameters live in the Hydra
config, which cannot interpolate the job's ``method`` node, so this sweeper reads them once the
whole config is composed: ``method.search``, then any ``hydra.sweeper.params`` given explicitly
(which win). Everything else — seeded TPE, trials, directions, launchers — is Optuna's sweeper.
"""

from __future__ import annotations

from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf


class MethodSearchSweeper(OptunaSweeper):
    """`OptunaSweeper` whose search space starts from the composed config's ``method.search``."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        explicit = OmegaConf.to_container(self.sweeper.params) if self.sweeper.params else {}
        self.sweeper.params = OmegaConf.create({**OmegaConf.to_container(config.method.search), **explicit})
