"""Settings of `make bench` (`conf/bench.yaml`) and the `conf/train.yaml` overrides they stand for."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ctrlora.errors import ConfigError

MODEL_ALIASES = {"small": "bench-small"}  # bench.model=small -> conf/model/bench-small.yaml
ACCELERATORS = ("auto", "cpu", "gpu")
REFERENCE_METHOD = "lora"


@dataclass
class EstimatorSpec:
    """One row of the estimator table: `conf/train.yaml` overrides that pick the `curvature=` settings,
    whether the estimate also returns the weight gradient (as CG-LoRA and CTR-LoRA ask), how many
    calibration batches to time it on, and a sketched gradient's rank."""

    overrides: list[str] = field(default_factory=list)
    want_grad: bool = False
    batches: int | None = None  # calibration batches to time it on; None: bench.estimator_batches
    sketch_rank: int | None = None  # with curvature.grad_mode=sketch: the largest rank read (CTR-LoRA's r_max)


@dataclass
class BenchSettings:
    """What `python -m ctrlora.bench` measures (docs/EVALUATION.md §3); see conf/bench.yaml for each key."""

    model: str = "small"
    model_path: str | None = None
    accelerator: str = "auto"
    methods: list[str] = MISSING  # conf/bench.yaml lists them
    steps: int = 20
    warmup: int = 2
    train_length: int = 1000
    batch_size: int = 8
    seq_len: int = 32
    calibration_samples: int = 64
    fraction_samples: list[int] = field(default_factory=lambda: [128, 256, 2048])
    estimators: dict[str, EstimatorSpec] = MISSING
    estimator_batches: int = 4
    threads: int | None = 1
    eval_limit: int = 200  # documents of the local task in the evaluation line (ours vs lm-eval's CLI); 0: none
    output_dir: str = "bench"
    train_overrides: list[str] = field(default_factory=list)

    @property
    def model_group(self) -> str:
        """The `model=` choice of conf/train.yaml (`small` is the bench's own ~30M-parameter Llama)."""
        return MODEL_ALIASES.get(self.model, self.model)

    @property
    def refresh_step(self) -> int:
        """The step after the timed ones, at whose end a refreshing method (CTR-LoRA) re-estimates its
        curvature once during the bench run (timed by the method's own report, not in the steps)."""
        return self.warmup + self.steps + 1

    @property
    def total_steps(self) -> int:
        """Optimizer steps per run: warm-up, the timed steps (each ends where the next one begins), the
        refresh step, and a last one (a refresh is never at the last step)."""
        return self.refresh_step + 1

    def validate(self) -> None:
        """Raise `ConfigError` naming the key for settings the bench cannot run with."""
        if REFERENCE_METHOD not in self.methods:
            raise ConfigError(
                f"bench.methods={list(self.methods)} must include {REFERENCE_METHOD!r}"
                " (the ratios are against it)"
            )
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"bench.methods={list(self.methods)} lists a method twice")
        if self.accelerator not in ACCELERATORS:
            valid = ", ".join(ACCELERATORS)
            raise ConfigError(f"bench.accelerator={self.accelerator!r} is unknown; valid: {valid}")
        positive = {
            "steps": self.steps, "train_length": self.train_length, "batch_size": self.batch_size,
            "seq_len": self.seq_len, "calibration_samples": self.calibration_samples,
            "estimator_batches": self.estimator_batches,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"bench.{key}={value} must be >= 1")
        if self.warmup < 0 or self.eval_limit < 0:
            raise ConfigError(f"bench.warmup={self.warmup} and bench.eval_limit={self.eval_limit} must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"bench.threads={self.threads} must be >= 1 (or null for torch's default)")
        if any(spec.batches is not None and spec.batches < 1 for spec in self.estimators.values()):
            raise ConfigError("bench.estimators.<name>.batches must be >= 1 (null: bench.estimator_batches)")
        if any(samples < 1 for samples in self.fraction_samples):
            raise ConfigError(f"bench.fraction_samples={list(self.fraction_samples)} must all be >= 1")

    def train_overrides_for(self, method: str, trainer: str, run_dir: str) -> list[str]:
        """`conf/train.yaml` overrides of one bench run: every method on the same model, packed batches
        of `batch_size` × `seq_len` tokens, calibration batches of the same size, no evaluation, and
        CTR-LoRA's curvature refresh at `refresh_step`."""
        overrides = [
            f"method={method}", f"model={self.model_group}", f"trainer={trainer}", "eval=none",
            f"trainer.max_steps={self.total_steps}", "trainer.progress_bar=false",
            f"data.batch_size={self.batch_size}", f"data.max_length={self.seq_len}", "data.packing=true",
            f"calibration.num_samples={self.calibration_samples}",
            f"calibration.batch_size={self.batch_size}",
            f"run_dir={run_dir}",
        ]
        if method == "ctrlora":
            overrides.append(f"method.ctr.refresh_every={self.refresh_step}")  # one refresh, timed on its own
        if self.model_path is not None:
            overrides.append(f"model.path={self.model_path}")
        return overrides + list(self.train_overrides)


@dataclass
class BenchConfig:
    bench: BenchSettings = field(default_factory=BenchSettings)


def register_bench_config() -> None:
    """Register the schema that `conf/bench.yaml` extends (idempotent)."""
    ConfigStore.instance().store(name="bench_schema", node=BenchConfig)
