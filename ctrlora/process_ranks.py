"""Which process of a run this is, before Lightning has set up the process group.

A multi-process run's ranks are started by one of three launchers, and all of them execute
`run.train` from the top: Lightning's own (rank 0 re-runs the script for ranks 1.. when `fit`
starts, with `LOCAL_RANK` set), SLURM (`srun` starts every task, `SLURM_PROCID`), or submitit's
local executor (`SUBMITIT_LOCAL_*`, which Lightning does not read). Everything that writes or
deletes run-dir files outside Lightning must happen on rank 0 only, or a late rank undoes what
rank 0 already wrote (moves away the fresh metrics.csv of a resumed run, say).
"""

from __future__ import annotations

import os

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # Lightning's order


def adopt_submitit_ranks() -> None:
    """Inside a submitit *local* job with several tasks: export the torch.distributed variables
    (`MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`) so that Lightning sees
    processes created externally and joins them instead of launching its own.

    Under SLURM Lightning reads SLURM's variables itself; outside submitit this does nothing.
    """
    if (
        os.environ.get("SUBMITIT_EXECUTOR") != "local"
        or int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) < 2
    ):
        return
    if "RANK" in os.environ:  # already exported (a second run in the same job)
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def process_rank() -> int:
    """This process's global rank as its launcher set it (0 for a single process)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None:
            return int(value)
    return 0


def is_rank_zero() -> bool:
    return process_rank() == 0
