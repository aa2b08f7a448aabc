"""Unknown config keys on the command line, refused with the keys that are valid there.

Hydra refuses ``optim.lrr=1e-3`` itself, suggesting ``+optim.lrr`` (which adds the key) and naming
none of the valid ones. `unknown_override_keys` runs before Hydra (train.py) and names them: a
key under a dataclass section of the schema must be one of its fields (the chosen method's, for
``method.*``). ``+key`` additions are left
to `ctrlora.config.validate_config`, which refuses them after composition with the same message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from ctrlora.errors import ConfigError


def unknown_key_error(schema: DictConfig, full_key: str) -> ConfigError:
    """The error for `full_key`, absent from `schema`: the valid keys of the deepest section of
    `schema` on the key's path."""
    parts = full_key.split(".")
    node, depth = schema, 0
    while depth < len(parts) - 1 and isinstance(node, DictConfig) and parts[depth] in node:
        node, depth = node[parts[depth]], depth + 1
    valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
    where = "here" if depth == len(parts) - 1 else f"in {'.'.join(parts[:depth])}"
    return ConfigError(f"unknown config key {full_key!r}; valid keys {where}: {', '.join(map(str, valid))}")


def unknown_override_keys(
    arguments: list[str], schema_class: type[Any], group_schemas: Mapping[str, Callable[[str], type[Any]]]
) -> None:
    """Raise `ConfigError` for the first ``a.b=value`` whose section ``a`` is a dataclass of
    `schema_class` without field ``b`` (at any depth). A group chosen on the command line
    (``method=lora``) whose schema depends on the choice takes ``group_schemas[group](choice)``.
    Additions, deletions, ``hydra.*`` and arguments Hydra cannot parse (it reports those) are passed over."""
    schema = OmegaConf.structured(schema_class)
    try:
        overrides = OverridesParser.create().parse_overrides([arg for arg in arguments if not arg.startswith("-")])
    except HydraException:
        return
    for override in overrides:
        choice = override.value()
        if override.key_or_group in group_schemas and override.type == OverrideType.CHANGE and isinstance(choice, str):
            schema[override.key_or_group] = OmegaConf.structured(group_schemas[override.key_or_group](choice))
    for override in overrides:
        key = override.key_or_group
        if override.type != OverrideType.CHANGE or override.package or "." not in key or key.startswith("hydra."):
            continue
        node: Any = schema
        for part in key.split("."):
            if not is_dataclass_node(node):
                break  # a free mapping (eval.tasks) takes any key
            if part not in node:
                raise unknown_key_error(schema, key)
            node = node[part]


def is_dataclass_node(node: Any) -> bool:
    """A schema section typed by a dataclass (its keys fixed), not a free mapping such as eval.tasks."""
    return isinstance(node, DictConfig) and OmegaConf.get_type(node) not in (dict, None)
