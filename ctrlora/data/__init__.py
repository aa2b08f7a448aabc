"""Training data: sources, formats, tokenisation with prompt masking, packing, batching, calibration."""

from ctrlora.data.calibration import calibration_dataloader, calibration_indices
from ctrlora.data.collate import PadCollator
from ctrlora.data.datamodule import DataStats, FinetuneDataModule
from ctrlora.data.formats import (
    FORMATS,
    ClassificationRow,
    Segment,
    causal_segments,
    classification_completion,
    classification_prompt,
    classification_row,
)
from ctrlora.data.packing import pack_examples
from ctrlora.data.sampler import StepSampler
from ctrlora.data.sources import RowTable, load_rows
from ctrlora.data.tokenization import IGNORE_INDEX, tokenize_causal, tokenize_classification

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "ClassificationRow",
    "DataStats",
    "FinetuneDataModule",
    "PadCollator",
    "RowTable",
    "Segment",
    "StepSampler",
    "calibration_dataloader",
    "calibration_indices",
    "causal_segments",
    "classification_completion",
    "classification_prompt",
    "classification_row",
    "load_rows",
    "pack_examples",
    "tokenize_causal",
    "tokenize_classification",
]
