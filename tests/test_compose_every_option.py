"""Every option of every config group composes as `python train.py <group>=<option>` composes it, and
what it names exists.

The groups and options are discovered, not listed: every folder of files under conf/ (model, method,
data, trainer, logger, curvature, eval, experiment, hydra/launcher) and every group ctrlora stores in
Hydra's ConfigStore (hydra/sweeper=optuna), with all the options Hydra offers for each (conf/ files,
ConfigStore nodes and plugins' options alike). For each option the composed config

- records the option as the group's choice, holds every value the option's file sets (and, for an
  experiment, the options its defaults list overrides), names itself (`name`, `kind` or `suite` equals
  the option), resolves the run dir from it, passes `validate_config` and becomes `TrainConfig`;

and then, offline and on CPU, what the option names is built: the trainer's strategy and Lightning
Trainer (GPU trainers refused by `check_devices` without a GPU, and their multi-process strategies
built in the documented CPU form), the loggers writing into the run dir (W&B offline), the curvature
estimator from `ESTIMATORS` run on a tiny Llama, the method from `METHODS`, the model's architecture on
the meta device (its targets, its shipped config or published size; a hub model offline is refused
before any load), the data set's calibration batches, the eval suite's input check, and the Hydra
launcher and sweeper objects.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, TWO_CPU_PROCESSES, with_test_defaults
from curvature.helpers import lm_batches, targets_of, tiny_llama
from hydra import compose, initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import AutoConfig

from ctrlora import report
from ctrlora.backbones import build_tiny_tokenizer, meta_model, package_weights_dir
from ctrlora.config import TrainConfig, method_schema, validate_config
from ctrlora.curvature.estimate import ESTIMATORS, estimate_curvature
from ctrlora.data.datamodule import FinetuneDataModule
from ctrlora.environment import (
    check_devices,
    check_eval_data,
    check_model_path,
    check_offline_weights,
    check_packages,
)
from ctrlora.errors import ConfigError
from ctrlora.methods.base import METHODS, build_method, parameter_count, target_linears

CONF = ROOT / "conf"
RUN_DIR = "runs/compose-every-option"  # never written: the tests that write use tmp_path
SCHEMA_FIELDS = {field.name: field.type for field in dataclasses.fields(TrainConfig)}
# Parameter counts of the hub checkpoints (model cards / their safetensors index), for the `arch` sections.
PUBLISHED_PARAMETERS = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama3.1-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
}


def file_groups() -> set[str]:
    """Config groups with files under conf/ (conf/'s own files are primary configs, not options)."""
    return {path.parent.relative_to(CONF).as_posix() for path in CONF.rglob("*") if path.is_file()} - {"."}


def stored_groups(node: dict[str, Any] | None = None, group: str = "") -> set[str]:
    """Config groups in which ctrlora stores a node in Hydra's ConfigStore."""
    groups = set()
    for key, value in (ConfigStore.instance().repo if node is None else node).items():
        if isinstance(value, dict):
            groups |= stored_groups(value, f"{group}/{key}" if group else key)
        elif value.provider == "ctrlora" and group:
            groups.add(group)
    return groups


with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
    _LOADER = GlobalHydra.instance().config_loader()
    OPTIONS = {
        group: _LOADER.get_group_options(group, results_filter=ObjectType.CONFIG)
        for group in sorted(file_groups() | stored_groups())
    }
ALL_OPTIONS = [
    pytest.param(group, option, id=f"{group}={option}")
    for group, names in OPTIONS.items()
    for option in names
]


def options_of(group: str) -> list[str]:
    assert OPTIONS.get(group), f"no options found for config group {group!r}"
    return OPTIONS[group]


@functools.cache
def compose_option(group: str, option: str, *extra: str) -> DictConfig:
    """conf/train.yaml with `group=option` (on the tests' backbone unless the option is an experiment),
    with the Hydra node, as train.py's `@hydra.main` composes it (composed once: do not modify)."""
    overrides = with_test_defaults([f"{group}={option}", f"run_dir={RUN_DIR}", *extra])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def without_hydra(cfg: DictConfig) -> DictConfig:
    """What train.py's task function receives: the composed config less its `hydra` node."""
    job = cfg.copy()
    with open_dict(job):
        del job["hydra"]
    return job


def train_config(group: str, option: str, *extra: str) -> tuple[DictConfig, TrainConfig]:
    """The validated job config and its `TrainConfig` (a fresh copy)."""
    job, train = _train_config(group, option, *extra)
    return job.copy(), copy.deepcopy(train)


@functools.cache
def _train_config(group: str, option: str, *extra: str) -> tuple[DictConfig, TrainConfig]:
    job = without_hydra(compose_option(group, option, *extra))
    validate_config(job)
    return job, OmegaConf.to_object(job)


def leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(key path, value) of every leaf of a plain container (keys may hold dots: sweeper params)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*path, str(key)))
    else:
        yield path, node


def is_global(file: Path) -> bool:
    """Whether the file's header comments declare `# @package _global_` (an experiment's overrides)."""
    header = []
    for line in file.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    return any(line.split() == ["#", "@package", "_global_"] for line in header)


@pytest.fixture
def hydra_config() -> Iterator[Any]:
    """Install a composed config as Hydra's runtime config (what @hydra.main does), then clear it."""
    yield HydraConfig.instance().set_config
    HydraConfig.instance().cfg = None


def test_every_file_under_conf_is_an_option_hydra_lists() -> None:
    """A file Hydra does not see as an option (a .yml suffix, a folder typo) would silently be skipped."""
    for group in file_groups():
        for path in (CONF / group).iterdir():
            if path.is_file():
                assert path.suffix == ".yaml" and path.stem in OPTIONS[group], path
    assert {"model", "method", "data", "trainer", "logger", "curvature", "eval", "experiment"} <= set(OPTIONS)
    optuna = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    assert (
        "optuna" in OPTIONS.get("hydra/sweeper", [])
    ) == optuna  # stored by ctrlora.config.register_configs


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS)
def test_option_composes_validates_and_holds_its_file(group: str, option: str, hydra_config) -> None:
    cfg = compose_option(group, option)
    assert cfg.hydra.runtime.choices[group] == option
    file = CONF / group / f"{option}.yaml"
    if file.exists():  # every value the file sets is in the composed config, at the option's package
        body = OmegaConf.to_container(OmegaConf.load(file), resolve=False)
        defaults = body.pop("defaults", [])
        package = "" if is_global(file) else group.replace("/", ".")
        composed = OmegaConf.to_container(OmegaConf.select(cfg, package) if package else cfg, resolve=False)
        for key, value in leaves(body):
            actual = composed
            for part in key:
                actual = actual[part]
            assert actual == value, (
                f"{group}={option}: {'.'.join(key)} is {actual!r}, the file sets {value!r}"
            )
        for entry in defaults:  # an experiment's `override /group: option` entries are the run's choices
            for target, choice in entry.items() if isinstance(entry, dict) else []:
                if not target.startswith("override "):
                    continue  # a schema a config file extends (conf/method/*.yaml: /schema/method@_here_)
                assert cfg.hydra.runtime.choices[target.removeprefix("override ").lstrip("/")] == choice

    hydra_config(cfg)
    run_dir = OmegaConf.select(cfg, "hydra.run.dir")  # the deterministic run dir names the run's options
    assert run_dir.startswith(f"runs/{cfg.model.name}/{cfg.method.name}/{cfg.data.name}/")
    _, train = train_config(group, option)  # validate_config, then OmegaConf.to_object
    assert isinstance(train, TrainConfig) and train.run_dir == RUN_DIR
    if group in SCHEMA_FIELDS:
        node = getattr(train, group)
        # the group's own dataclass (annotations are strings); a method's: its own schema (METHOD_CONFIGS)
        expected = method_schema(option).__name__ if group == "method" else SCHEMA_FIELDS[group]
        assert type(node).__name__ == expected
        identity = next((key for key in ("name", "kind", "suite") if hasattr(node, key)), None)
        if identity is not None:  # what results.json, run dirs and the registries know the option by
            assert getattr(node, identity) == option, (
                f"{group}={option} is {identity}={getattr(node, identity)!r}"
            )


@pytest.mark.parametrize("option", options_of("trainer"))
def test_trainer_option_builds_its_strategy_and_trainer(option: str, tmp_path: Path) -> None:
    from lightning.pytorch.strategies import Strategy

    from ctrlora.trainers import build_strategy, build_trainer

    job, cfg = train_config("trainer", option)
    strategy = build_strategy(cfg.trainer)
    if cfg.trainer.strategy == "auto":
        assert strategy == "auto"
    else:  # a Strategy object, built in its documented CPU form too: two gloo processes in fp32
        assert isinstance(strategy, Strategy)
        _, on_cpu = train_config("trainer", option, *TWO_CPU_PROCESSES)
        trainer = build_trainer(on_cpu.trainer, [], [], tmp_path)
        assert type(trainer.strategy) is type(build_strategy(on_cpu.trainer))
        assert trainer.num_devices == 2 and trainer.precision == "32-true"
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=f"trainer={option} .* needs a GPU"):
            check_devices(job.trainer)  # train.py refuses it before anything loads
        pytest.skip(f"trainer={option} builds its Lightning Trainer on a GPU only, and none is visible")
    check_devices(job.trainer)
    trainer = build_trainer(cfg.trainer, [], [], tmp_path)
    assert trainer.max_steps == cfg.trainer.max_steps and trainer.precision == cfg.trainer.precision
    assert trainer.accumulate_grad_batches == cfg.trainer.accumulate_grad_batches
    if cfg.trainer.strategy != "auto":
        assert type(trainer.strategy) is type(strategy)


@pytest.mark.parametrize("option", options_of("logger"))
def test_logger_option_writes_into_the_run_dir(option: str, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from ctrlora.trainers import build_loggers

    _, cfg = train_config("logger", option)
    loggers = build_loggers(cfg.logger, tmp_path, report.run_name(cfg), dataclasses.asdict(cfg))
    try:
        assert isinstance(loggers[0], CSVLogger) and len(loggers) == 1 + (option != "csv")
        for logger in loggers:
            logger.log_metrics({"probe": 1.5}, step=0)
            logger.save()
            assert Path(logger.save_dir).resolve() == tmp_path.resolve()
            if isinstance(logger, WandbLogger):  # offline, with the run's config as hyperparameters
                assert logger.experiment.config["seed"] == cfg.seed
                assert logger.experiment.config["method"]["name"] == cfg.method.name
        assert "probe" in (tmp_path / "metrics.csv").read_text()
        written = {path.relative_to(tmp_path).parts[0] for path in tmp_path.rglob("*") if path.is_file()}
        assert written >= {"metrics.csv", *(() if option == "csv" else (option,))}  # tensorboard/, wandb/
    finally:
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()


@pytest.mark.parametrize("option", options_of("curvature"))
def test_curvature_option_runs_its_estimator(option: str) -> None:
    _, cfg = train_config("curvature", option)
    assert cfg.curvature.kind in ESTIMATORS
    model, batches = tiny_llama(), lm_batches()[:1]
    targets = targets_of(model)
    result = estimate_curvature(model, batches, targets, cfg.curvature, progress=False)
    assert result.report.kind == cfg.curvature.kind and list(result.modules) == targets
    for name in targets:
        assert result[name].a is not None and torch.isfinite(result[name].a.dense()).all(), name


@pytest.mark.parametrize("option", options_of("method"))
def test_method_option_builds_its_registered_method(option: str, tmp_path: Path) -> None:
    job, cfg = train_config("method", option)
    check_packages(job)  # e.g. qlora's bitsandbytes
    method = build_method(cfg, total_steps=cfg.trainer.max_steps, run_dir=tmp_path)
    assert type(method) is METHODS[option] and method.name == option


@pytest.mark.parametrize("option", options_of("model"))
def test_model_option_describes_its_architecture_without_loading_it(option: str) -> None:
    job, cfg = train_config("model", option)
    model = cfg.model
    assert model.task in ("causal_lm", "sequence_classification")
    assert sum(bool(source) for source in (model.hub_id, model.package_dir, model.builder)) == 1
    check_model_path(model)
    backbone = meta_model(model)  # from `arch` or the tiny builder's shape: no weights are read or downloaded
    for target in model.target_modules:
        assert target_linears(backbone, [target]), (
            f"model={option}: target {target!r} matches no linear layer"
        )
    if model.package_dir:  # the weights ship in a package: its config.json is the `arch` section
        shipped = AutoConfig.from_pretrained(package_weights_dir(model))
        for key, value in model.arch.items():
            assert getattr(shipped, key) == value, (
                f"model={option}: arch.{key}={value}, shipped {getattr(shipped, key)}"
            )
    if model.hub_id and not model.path:  # offline with an empty cache: refused before anything loads
        with pytest.raises(ConfigError, match="has no local copy"):
            check_offline_weights(job)
    if option in PUBLISHED_PARAMETERS:
        assert parameter_count(backbone) == PUBLISHED_PARAMETERS[option]


@pytest.mark.parametrize("option", options_of("data"))
def test_data_option_gives_calibration_batches(option: str) -> None:
    _, cfg = train_config("data", option)
    datamodule = FinetuneDataModule(
        cfg.data, build_tiny_tokenizer(), task="causal_lm", calibration=cfg.calibration, base_dir=ROOT
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.calibration_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape and (batch["labels"] != -100).any()
    assert (datamodule.label_names is not None) == (cfg.data.format == "classification")


@pytest.mark.parametrize("option", options_of("eval"))
def test_eval_option_checks_its_inputs_before_training(option: str) -> None:
    job, cfg = train_config("eval", option)
    stock = [name for name, task in cfg.eval.tasks.items() if task.local is None]
    if stock and cfg.eval.data_dir is None:  # hub data sets, offline and not cached: refused by name
        with pytest.raises(ConfigError, match=f"eval={option} reads .* from the Hugging Face hub"):
            check_eval_data(job)
    else:  # local tasks: their files are read and every label is among the choices
        check_eval_data(job)
    for task in cfg.eval.tasks.values():
        if task.local is not None:
            assert (ROOT / task.local.test).is_file() and task.local.choices


# Hydra's own entry points for its plugin groups (what `python train.py -m` calls; they run the plugin's setup)
PLUGIN_BUILDERS = {"hydra/launcher": "instantiate_launcher", "hydra/sweeper": "instantiate_sweeper"}


@pytest.mark.parametrize(
    ("group", "option"),
    [
        pytest.param(group, option, id=f"{group}={option}")
        for group in PLUGIN_BUILDERS
        for option in OPTIONS.get(group, [])
    ],
)
def test_hydra_plugin_option_is_set_up_by_hydra(group: str, option: str) -> None:
    cfg = compose_option(group, option)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=Callbacks(cfg))
        build = getattr(Plugins.instance(), PLUGIN_BUILDERS[group])
        plugin = build(hydra_context=context, task_function=lambda _: None, config=cfg)
    target = OmegaConf.select(cfg, group.replace("/", "."))._target_
    assert f"{type(plugin).__module__}.{type(plugin).__qualname__}" == target
