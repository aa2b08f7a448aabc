"""Two gloo processes on disjoint halves of the data give the single-process estimate."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.estimate import estimate_curvature
from ctrlora.curvature.result import CurvatureResult

from .helpers import assert_close, lm_batches, targets_of, tiny_llama

LENGTHS = ((7, 5, 6), (4, 8), (6, 6), (3, 8, 5))
CONFIGS = {
    "kfac": CurvatureConfig(kind="kfac"),
    "sketch": CurvatureConfig(kind="kfac", grad_mode="sketch"),
    "hutchinson": CurvatureConfig(kind="hutchinson", probes=1),
}


def estimates(batches) -> dict[str, CurvatureResult]:
    model = tiny_llama()
    targets = targets_of(model, ["q_proj", "v_proj", "down_proj"])
    return {
        name: estimate_curvature(model, batches, targets, cfg, want_grad=True, sketch_rank=3, progress=False)
        for name, cfg in CONFIGS.items()
    }


def _worker(rank: int, world_size: int, workdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world_size
    )
    try:
        results = estimates(lm_batches(lengths=LENGTHS)[rank::world_size])
        if rank == 0:
            torch.save({name: result.state_dict() for name, result in results.items()}, f"{workdir}/ddp.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path: Path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    saved = torch.load(tmp_path / "ddp.pt", weights_only=True)
    distributed = {name: CurvatureResult.from_state_dict(state) for name, state in saved.items()}
    single = estimates(lm_batches(lengths=LENGTHS))
    for name in single["kfac"]:
        kfac, ddp_kfac = single["kfac"][name], distributed["kfac"][name]
        assert ddp_kfac.tokens == kfac.tokens == 38
        assert_close(ddp_kfac.a.dense(), kfac.a.dense(), 1e-10)
        assert_close(ddp_kfac.g.dense(), kfac.g.dense(), 1e-10)
        assert_close(ddp_kfac.grad, kfac.grad, 1e-10)
        sketch, ddp_sketch = single["sketch"][name].grad_sketch, distributed["sketch"][name].grad_sketch
        assert_close(ddp_sketch.svd(3)[1], sketch.svd(3)[1], 1e-10)
        assert_close(distributed["hutchinson"][name].grad, single["hutchinson"][name].grad, 1e-10)
        assert distributed["hutchinson"][name].tokens == 38
