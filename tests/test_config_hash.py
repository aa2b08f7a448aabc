"""`config_hash` identifies the experiment: where a run writes, logs or caches does not change it."""

from __future__ import annotations

from conftest import compose_config
from omegaconf import OmegaConf

from ctrlora.report import config_hash


def hash_of(*overrides: str) -> str:
    return config_hash(OmegaConf.to_object(compose_config(["method=ctrlora", *overrides])))


def test_the_hash_ignores_where_a_run_writes_and_logs_and_follows_what_it_computes() -> None:
    reference = hash_of("run_dir=runs/a")
    elsewhere = hash_of(
        "run_dir=runs/b", "resume=true", "overwrite=true", "logger=wandb", "logger.project=other",
        "logger.tags=[x]", "trainer.progress_bar=false", "trainer.checkpoint_every_n_steps=7",
        "trainer.log_every_n_steps=5", "data.num_workers=2", "curvature.cache_dir=cache/curvature",
        "eval.cache_dir=cache/eval", "eval.data_dir=mirrors",
    )
    assert elsewhere == reference
    changes = (
        "seed=1", "optim.lr=1e-3", "method.ctr.lambda0=0.5", "curvature=hutchinson", "data.batch_size=4",
        "trainer.max_steps=7", "calibration.num_samples=16", "method=lora",
    )
    for change in changes:
        assert hash_of("run_dir=runs/a", change) != reference, change
