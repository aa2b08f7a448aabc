"""Importing this module registers every built-in method with `base.METHODS`."""

from ctrlora.methods import adalora, lora_family  # noqa: F401
