"""PEFT methods, each registered by name (see `base.register_method`)."""

from ctrlora.methods import adalora, lora_family  # noqa: F401  (registration side effects)
from ctrlora.methods.base import METHODS, Method, build_method

__all__ = ["METHODS", "Method", "build_method"]
