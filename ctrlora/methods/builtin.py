"""Importing this module registers every built-in method with `base.METHODS`."""

from ctrlora.methods import adalora, cg_lora, ctr_lora, lora_family, reference, sensitivity_lora  # noqa: F401
