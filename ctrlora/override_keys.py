"""Unknown config keys on the command line, refused with the keys that are valid there.

Hydra refuses ``optim.lrr=1e-3`` itself, suggesting ``+optim.lrr`` (which adds the key) and naming
none of the valid ones. `unknown_override_keys` runs before Hydra (train.py) and names them: a
key under a dataclass section of the schema must be one of its fields. ``+key`` additions are left
to `ctrlora.config.validate_config`, which refuses them after composition with the same message.
"""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from ctrlora.errors import ConfigError


def unknown_key_error(schema: DictConfig, full_key: str) -> ConfigError:
    """The error for `full_key`, absent from `schema`: the valid keys at its parent."""
    parent = full_key.rpartition(".")[0]
    node = OmegaConf.select(schema, parent) if parent else schema
    valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
    return ConfigError(f"unknown config key {full_key!r}; valid keys here: {', '.join(map(str, valid))}")


def unknown_override_keys(arguments: list[str], schema_class: type[Any]) -> None:
    """Raise `ConfigError` for the first ``a.b=value`` whose section ``a`` is a dataclass of
    `schema_class` without field ``b`` (at any depth). Group choices (``method=lora``), additions,
    deletions, ``hydra.*`` and arguments Hydra cannot parse (it reports those) are passed over."""
    schema = OmegaConf.structured(schema_class)
    try:
        overrides = OverridesParser.create().parse_overrides([arg for arg in arguments if not arg.startswith("-")])
    except HydraException:
        return
    for override in overrides:
        key = override.key_or_group
        if override.type != OverrideType.CHANGE or override.package or "." not in key or key.startswith("hydra."):
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(schema, parent, default=None)
        if is_dataclass_node(node) and leaf not in node:
            raise unknown_key_error(schema, key)


def is_dataclass_node(node: Any) -> bool:
    """A schema section typed by a dataclass (its keys fixed), not a free mapping such as eval.tasks."""
    return isinstance(node, DictConfig) and OmegaConf.get_type(node) not in (dict, None)
