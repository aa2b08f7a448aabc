"""Structured configs: one typed dataclass per config group, registered in Hydra's ConfigStore.

`conf/train.yaml` extends `train_schema` (``TrainConfig``), so every group file is merged into a
typed node: a misspelt key fails at compose time naming the key and the dataclass, and an
unknown group choice fails listing the available options (Hydra's own message).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from ctrlora.curvature.config import CurvatureConfig
from ctrlora.errors import ConfigError
from ctrlora.evaluation.config import EvalConfig, objective_metric
from ctrlora.methods.settings import CgSettings, CtrSettings, SensitivitySettings
from ctrlora.override_keys import unknown_key_error
from ctrlora.task_types import CAUSAL_LM

DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TinyLlamaConfig:
    """Shape of the locally built tiny Llama (no download; weights from `seed`)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    seed: int = 0


@dataclass
class ModelConfig:
    """A backbone: a HF hub id, a local `path` (wins over the hub id), or the tiny local builder."""

    name: str = "tiny-llama"
    hub_id: str | None = None
    path: str | None = None  # local copy of the weights; required offline for hub models
    task: str = CAUSAL_LM  # causal_lm | sequence_classification
    builder: str | None = None  # "tiny_llama": built locally and cached on disk
    package_dir: str | None = None  # weights shipped inside an installed Python package: "pkg/subdir"
    tiny: TinyLlamaConfig = field(default_factory=TinyLlamaConfig)
    arch: dict[str, Any] = field(default_factory=dict)  # model_type + config kwargs, for meta-device use
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # eager | sdpa | flash_attention_2
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    target_modules: list[str] = field(default_factory=lambda: list(DECODER_TARGETS))
    num_labels: int | None = None  # sequence classification heads
    modules_to_save: list[str] = field(default_factory=list)  # e.g. the classifier head


@dataclass
class AdaLoraSettings:
    """PEFT AdaLoRA schedule as fractions of total steps (docs/METHODS.md §1)."""

    init_r_factor: float = 1.5
    tinit: float = 0.05
    tfinal: float = 0.2
    delta_t: float = 0.01
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5


@dataclass
class MethodConfig:
    """A PEFT method: the LoRA family's settings, shared by every method (docs/METHODS.md §2). A method
    with settings of its own has a subclass below (`METHOD_CONFIGS`), so its keys exist only when it
    is chosen: ``method=lora method.ctr.lambda0=0.5`` fails at composition, naming the key."""

    name: str = "lora"
    alpha: float = 16.0
    dropout: float = 0.05
    rslora: bool = False
    use_dora: bool = False
    init: str = "default"  # PEFT init_lora_weights: default | gaussian | pissa_niter_4 | ...
    quantize_4bit: bool = False
    loraplus_ratio: float | None = None  # lr(B) / lr(A)
    scaling: str = "constant"  # unequal ranks: constant | rslora | standard
    # hydra/sweeper=optuna searches these (Optuna's override grammar): the learning rate for every method,
    # the method's own knob where it has one (conf/method/ctrlora.yaml, cg_lora.yaml)
    search: dict[str, str] = field(default_factory=lambda: {"optim.lr": "tag(log, interval(1e-5, 1e-2))"})


ADALORA_REFUSED_SWITCHES = {"rslora": False, "use_dora": False, "init": "default", "loraplus_ratio": None}  # unset


@dataclass
class AdaLoraMethodConfig(MethodConfig):
    adalora: AdaLoraSettings = field(default_factory=AdaLoraSettings)

    def __post_init__(self) -> None:
        switches = [f"method.{key}={getattr(self, key)!r}" for key, unset in ADALORA_REFUSED_SWITCHES.items()
                    if getattr(self, key) != unset]
        if switches:
            raise ConfigError(
                f"method=adalora does not take {', '.join(switches)}: AdaLoRA has its own SVD"
                " parametrisation (PEFT's AdaLoraConfig); remove them, or use a LoRA-family method"
            )


@dataclass
class SensitivityMethodConfig(MethodConfig):
    sensitivity: SensitivitySettings = field(default_factory=SensitivitySettings)

    def __post_init__(self) -> None:
        self.sensitivity.validate()


@dataclass
class CgMethodConfig(MethodConfig):
    cg: CgSettings = field(default_factory=CgSettings)

    def __post_init__(self) -> None:
        self.cg.validate()


@dataclass
class CtrMethodConfig(MethodConfig):
    ctr: CtrSettings = field(default_factory=CtrSettings)

    def __post_init__(self) -> None:
        self.ctr.validate()


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {  # schema/method/<name>; the LoRA family's is schema/method/base
    "adalora": AdaLoraMethodConfig,
    "sensitivity_lora": SensitivityMethodConfig,
    "cg_lora": CgMethodConfig,
    "ctrlora": CtrMethodConfig,
}


def method_schema(name: str) -> type[MethodConfig]:
    """The schema of ``method=<name>``."""
    return METHOD_CONFIGS.get(name, MethodConfig)


@dataclass
class DataConfig:
    """A training set: source, format and the names of its fields."""

    name: str = "fortune_topics"
    train: str = "data/fortune_topics/train.jsonl"  # local json/jsonl/parquet path or HF dataset id
    test: str | None = "data/fortune_topics/test.jsonl"
    val: str | None = None  # a validation file; null: data.val_fraction of data.train is held out
    val_fraction: float = 0.1  # held out of data.train (when data.val is null) for validation; 0: none
    split_seed: int = 0  # the permutation that picks the held-out rows (independent of the run's seed)
    hf_config: str | None = None
    hf_split: str = "train"
    format: str = "classification"  # alpaca | prompt_completion | chat | classification
    # field names, by format
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    # classification rendered as instruction data for causal LMs
    prompt_template: str = "{text}\nWhat is the topic of this quotation?\nTopic:"
    completion_template: str = " {label}"
    max_length: int = 256
    packing: bool = False
    batch_size: int = 8
    max_train_samples: int | None = None
    num_workers: int = 0


@dataclass
class TrainerConfig:
    """Lightning Trainer settings; `strategy` is auto | ddp | fsdp."""

    name: str = "cpu"
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_steps: int = 200
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 1
    checkpoint_every_n_steps: int = 50
    process_group_backend: str | None = None  # gloo for CPU multi-process
    progress_bar: bool = True


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to zero."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03


@dataclass
class LoggerConfig:
    name: str = "csv"  # csv | wandb | tensorboard
    project: str = "ctrlora"
    entity: str | None = None
    group: str | None = None
    mode: str = "offline"  # wandb: online | offline | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class BudgetConfig:
    """Exactly one of `ratio` (fraction of backbone parameters) or `rank` (uniform-LoRA equivalent)."""

    ratio: float | None = None
    rank: int | None = 8


@dataclass
class CalibrationConfig:
    """The fixed, seeded calibration subset of the training set used by curvature methods."""

    num_samples: int = 64
    batch_size: int = 8
    seed: int = 0
    # A fresh head (model.modules_to_save) trained alone this many steps before calibration, for every
    # method; null: HEAD_WARMUP_STEPS for a model with a fresh head, 0 otherwise (ctrlora/head_warmup.py).
    head_warmup_steps: int | None = None
    head_warmup_lr: float = 1e-3


@dataclass
class TrainConfig:
    seed: int = 0
    run_dir: str = "runs/default"
    resume: bool = False
    overwrite: bool = False
    offline: bool = True  # set the Hugging Face offline variables (no hub calls, no telemetry) before loading
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def train_schema(method: type[MethodConfig]) -> DictConfig:
    """`TrainConfig` as a schema whose ``method`` section is typed by `method`."""
    schema = OmegaConf.structured(TrainConfig)
    schema.method = OmegaConf.structured(method)
    return schema


def load_train_config(path: Path) -> TrainConfig:
    """A run's saved config.yaml as the `TrainConfig` it ran with; `ConfigError` naming the file and the
    key when this version's schema no longer has it (a run made by another version of ctrlora)."""
    saved = OmegaConf.load(path)
    try:
        return OmegaConf.to_object(OmegaConf.merge(train_schema(method_schema(saved.method.name)), saved))
    except ConfigKeyError as error:
        raise ConfigError(f"{path} does not load with this version of ctrlora: unknown key {error.full_key!r}"
                          " (the run was made by another version)") from None


def validate_config(cfg: DictConfig) -> None:
    """Checks composition cannot make: keys added with `+`, and values with a valid range.

    Raises `ConfigError` naming the key, the value and what is allowed.
    """
    composed = OmegaConf.get_type(cfg.method)  # the schema the method's config file extends
    schema = train_schema(composed if isinstance(composed, type) and issubclass(composed, MethodConfig)
                          else method_schema(cfg.method.name))
    try:
        OmegaConf.merge(schema, OmegaConf.to_container(cfg))
    except ConfigKeyError as error:
        raise unknown_key_error(schema, str(error.full_key)) from None
    OmegaConf.to_object(cfg.method)  # the method's own checks (__post_init__), before anything loads
    if cfg.trainer.max_steps <= 0:
        raise ConfigError(f"trainer.max_steps={cfg.trainer.max_steps} must be > 0")
    if cfg.trainer.checkpoint_every_n_steps <= 0:
        raise ConfigError(f"trainer.checkpoint_every_n_steps={cfg.trainer.checkpoint_every_n_steps} must be > 0")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must lie in [0, 1) (0: no validation split)")
    if cfg.eval.val_every_n_steps is not None and cfg.eval.val_every_n_steps < 1:
        raise ConfigError(f"eval.val_every_n_steps={cfg.eval.val_every_n_steps} must be >= 1 (or null)")
    objective_metric(cfg.eval.val_metric, cfg.model.task)
    warmup = cfg.calibration
    if (warmup.head_warmup_steps or 0) < 0 or not warmup.head_warmup_lr > 0:
        raise ConfigError(
            f"calibration.head_warmup_steps={warmup.head_warmup_steps} must be >= 0 (or null) and"
            f" calibration.head_warmup_lr={warmup.head_warmup_lr} > 0"
        )
    if (warmup.head_warmup_steps or 0) > 0 and not cfg.model.modules_to_save:
        raise ConfigError(
            f"calibration.head_warmup_steps={warmup.head_warmup_steps} trains a fresh head, but model={cfg.model.name}"
            " has none (model.modules_to_save is empty); set calibration.head_warmup_steps=0"
        )
    if not cfg.optim.lr > 0 or cfg.optim.weight_decay < 0 or not 0 <= cfg.optim.warmup_ratio < 1:
        raise ConfigError(
            f"optim.lr={cfg.optim.lr} must be > 0, optim.weight_decay={cfg.optim.weight_decay} >= 0 and"
            f" optim.warmup_ratio={cfg.optim.warmup_ratio} in [0, 1)"
        )
    if (cfg.budget.ratio is None) == (cfg.budget.rank is None):
        raise ConfigError(
            f"set exactly one of budget.ratio and budget.rank (got ratio={cfg.budget.ratio},"
            f" rank={cfg.budget.rank}); e.g. budget.ratio=0.001 budget.rank=null"
        )


OFFLINE_ENV = {  # what `offline: true` sets: no hub lookups or retries, no telemetry
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
}


def apply_offline(offline: bool) -> None:
    """With `offline`, set OFFLINE_ENV in this process (and so its children); call before the
    Hugging Face libraries are imported, which read these at import."""
    if offline:
        os.environ.update(OFFLINE_ENV)


def dir_name(overrides: str, max_length: int = 120) -> str:
    """A run dir name from Hydra's `override_dirname`: `default` when empty, hashed tail when long.

    File names are capped at 255 bytes, and a sweep easily has more overrides than that.
    """
    if not overrides:
        return "default"
    if len(overrides) <= max_length:
        return overrides.replace("/", "_")
    digest = hashlib.sha256(overrides.encode()).hexdigest()[:10]
    return f"{overrides[: max_length - 11].replace('/', '_')}-{digest}"


def register_configs() -> None:
    """Register the schema that `conf/train.yaml` extends, ``hydra/sweeper=optuna`` (when
    hydra-optuna-sweeper is installed) and the resolvers (idempotent). Hydra's plugin scan runs
    first: it re-executes every plugin module, and the Optuna plugin's would otherwise re-store its
    own ``optuna`` option over ctrlora's."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for name, schema in {"base": MethodConfig, **METHOD_CONFIGS}.items():  # conf/method/*.yaml name theirs
        store.store(group="schema/method", name=name, node=schema)
    Plugins.instance()
    try:
        from hydra_plugins.ctrlora_launchers.search import register_sweeper_config
    except ImportError:  # hydra-optuna-sweeper missing: hydra/sweeper=optuna is then not a choice
        pass
    else:
        register_sweeper_config()
    OmegaConf.register_new_resolver("dir_name", dir_name, replace=True)
    OmegaConf.register_new_resolver("val_direction", val_direction, replace=True)


def val_direction(val_metric: str, task: str) -> str:
    """The sweep direction of ``eval.val_metric``: minimize a loss, maximize the classifier metrics."""
    return "minimize" if objective_metric(val_metric, task) == "loss" else "maximize"
