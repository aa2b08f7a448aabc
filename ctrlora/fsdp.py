"""FSDP2 for PEFT models (`trainer=fsdp`), through Lightning's `ModelParallelStrategy`.

Layout: `fully_shard` on every decoder layer (the model's `_no_split_modules` classes) and then on
the root PEFT model, over a 1-D data-parallel mesh of all ranks. FSDP2 shards each parameter on
dim 0 as a DTensor, so PEFT's mix of frozen base weights and trainable adapters needs nothing
special: only the trainable adapter gradients are reduce-scattered, and the optimizer state exists
for the (sharded) adapters alone. Gradients are averaged over ranks, so the module's global
token-mean loss gives the same update as one process with the same global batch.

Checkpoints (`AdapterFSDPStrategy`): one file written by rank 0 that holds the trainable
parameters and their optimizer state gathered to full tensors on the CPU, plus step, scheduler,
RNG and method state — never the frozen base weights (Lightning's default, a distributed
checkpoint, writes every shard of the whole model). A resume loads it on every rank and scatters
it back into the shards (`strict=False`, since the base weights are not in it).

Calibration happens before sharding, on the full model on each rank's device: at assembly, or for a
method that shards its calibration across ranks (CTR-LoRA) inside `fit`, in `setup` before
`configure_model` (`run.AdapterSetup`). CTR-LoRA's trust-region penalty all-gathers the sharded
adapters it needs (differentiably, `trust_region.full_weight`), and its refreshes run through the
root module, whose hooks gather the weights outside the decoder layers.

Evaluation runs on rank 0 alone, after the other ranks have finished, so under FSDP it evaluates
the backbone plus the saved adapter (`evaluation_model`) instead of the sharded in-memory model.

The adapter (`gather_adapter_state`): the same gather of the trainable parameters
(`get_model_state_dict(full_state_dict, cpu_offload, ignore_frozen_params)`, a collective every
rank enters), after which rank 0 writes stock PEFT files with `save_pretrained(..., state_dict=...)`. Refused before training starts: methods that convert
the adapter on export (PiSSA, OLoRA, CG-LoRA's shift; they load a second adapter into the model),
and AdaLoRA (PEFT's allocator works on whole matrices).

QLoRA under FSDP2 (GPU). `backbones.quantization_config` sets `bnb_4bit_quant_storage` to the
compute dtype (bf16), so a `Params4bit` weight is a bf16 tensor of packed 4-bit codes that FSDP2
shards and all-gathers like any other bf16 parameter; bitsandbytes keeps the quantisation state on
the `Linear4bit` module and re-attaches it to the gathered weight in forward. Run it as
`method=qlora trainer=fsdp` (`model.dtype=auto` is bf16 on GPU: storage, compute and FSDP's
`param_dtype` all bf16; adapters stay fp32 and are cast by FSDP's mixed-precision policy, gradients
reduced in fp32). On CPU the same path runs with fp32 storage; that is what the tests exercise
(2 gloo ranks match one process). Not yet run on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from peft import PeftModel
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from ctrlora.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

DATA_PARALLEL = "data_parallel"
LOW_PRECISION = {"bf16": torch.bfloat16, "16": torch.float16}
UNSHARDABLE_METHODS = {
    "adalora": "PEFT's rank allocator reads and masks whole matrices and gradients, FSDP holds shards; use trainer=ddp",
}


class AdapterFSDPStrategy(ModelParallelStrategy):
    """Pure data-parallel FSDP2 over all ranks whose checkpoints hold only what training changes."""

    def __init__(
        self, process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=False, process_group_backend=process_group_backend, timeout=timeout
        )

    def setup_environment(self) -> None:
        """One data-parallel mesh dimension spanning every rank (no tensor parallelism)."""
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trainable parameters as full CPU tensors (collective; complete on rank 0)."""
        assert self.model is not None
        return trainable_state(self.model)


def low_precision_dtype(precision: str) -> torch.dtype | None:
    """FSDP2's compute dtype for a Lightning precision string (`bf16-mixed` -> bf16), else None (fp32)."""
    return LOW_PRECISION.get(str(precision).split("-")[0])


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one: modules whose class is in the HF model's `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [module for module in base.modules() if type(module).__name__ in names]
    if not layers:
        raise ConfigError(
            f"trainer=fsdp: {type(base).__name__} declares no `_no_split_modules` blocks to shard"
            f" (found {sorted(names) or 'none'}); use trainer=ddp for this backbone"
        )
    return layers


def shard_model(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> None:
    """`fully_shard` each decoder layer, then the root, over `mesh` (idempotent).

    With `param_dtype` (bf16 on GPU) parameters are all-gathered and computed in that dtype while
    the sharded fp32 adapters and the fp32 gradient reduction keep the optimizer exact. 4-bit weights
    must already be stored in `param_dtype` (`bnb_4bit_quant_storage`): a cast would corrupt them.
    """
    if isinstance(model, FSDPModule):
        return
    storage = {param.dtype for param in model.parameters() if getattr(param, "quant_state", None) is not None}
    if param_dtype is not None and storage - {param_dtype}:
        raise ConfigError(
            f"trainer=fsdp computes in {param_dtype} but the 4-bit weights are stored as {sorted(map(str, storage))};"
            " FSDP's cast would corrupt their packed codes. Set model.dtype to the compute dtype (auto: bf16 on GPU)"
        )
    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def check_fsdp_support(method: Any) -> None:
    """Refuse, before training, a method that cannot work on sharded parameters."""
    if method.name in UNSHARDABLE_METHODS:
        raise ConfigError(
            f"method={method.name} cannot run under trainer=fsdp: {UNSHARDABLE_METHODS[method.name]}"
        )
    if getattr(method, "converts_on_export", False):
        raise ConfigError(
            f"method={method.name} (init={method.ctx.method.init}) converts its adapter on export by loading"
            " its initial adapter into the model, which FSDP's sharded model cannot; use trainer=ddp"
        )


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(param, DTensor) for param in model.parameters())


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters as full CPU tensors, keyed as in `model.state_dict()`.

    A collective every rank must enter; the frozen base is dropped before anything is gathered,
    and only rank 0 receives the tensors (the other ranks get an empty dict).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def gather_adapter_state(model: nn.Module) -> dict[str, Tensor] | None:
    """The PEFT adapter gathered from FSDP shards for `save_pretrained(state_dict=...)` on rank 0;
    None when the model is not sharded (PEFT then reads it directly). Every rank must call it."""
    return trainable_state(model) if is_sharded(model) else None


def evaluation_model(
    model: PeftModel, adapter_dir: Path, load_base: Callable[[], PreTrainedModel]
) -> PeftModel:
    """A model rank 0 can run alone: `model` itself, or — when FSDP shards it, whose forward needs every
    rank — the backbone from `load_base()` with the adapter just saved in `adapter_dir`."""
    if not is_sharded(model):
        return model
    return PeftModel.from_pretrained(load_base(), adapter_dir).eval()
