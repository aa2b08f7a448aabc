"""`FinetuneDataModule`: load, validate and tokenise a training set once; serve training batches
(`StepSampler`), the calibration loader, the validation loader (``data.val``, or
``data.val_fraction`` of the training rows held out by ``data.split_seed``: never trained on, never
in the calibration subset), and the raw test rows for evaluation.

Under data parallelism the Trainer must not inject its own sampler: build it with
``Trainer(use_distributed_sampler=False)``; `StepSampler` shards the batches itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ctrlora.config import CalibrationConfig, DataConfig
from ctrlora.data.calibration import calibration_dataloader
from ctrlora.data.collate import PadCollator
from ctrlora.data.formats import (
    ClassificationRow,
    Segment,
    causal_segments,
    check_format,
    classification_row,
    uses_chat_template,
)
from ctrlora.data.packing import pack_examples
from ctrlora.data.sampler import StepSampler
from ctrlora.data.sources import RowTable, load_rows
from ctrlora.data.tokenization import IGNORE_INDEX, TokenizedExample, tokenize_causal, tokenize_classification
from ctrlora.errors import ConfigError, DataError
from ctrlora.task_types import CAUSAL_LM, SEQUENCE_CLASSIFICATION, TASKS

HF_TEST_SPLIT = "test"  # the split read when data.test is a Hugging Face dataset id
HF_VALIDATION_SPLIT = "validation"  # the split read when data.val is a Hugging Face dataset id


@dataclass(frozen=True)
class DataStats:
    """Sizes of the tokenised training set (``sequences`` differ from ``examples`` when packing)."""

    num_examples: int
    num_sequences: int
    num_tokens: int
    num_supervised_tokens: int | None  # causal LM only: tokens with a label


def sorted_labels(values: list[str | int]) -> list[str | int]:
    """Distinct labels, sorted (ints before strings): position in this list is the class id."""
    return sorted(set(values), key=lambda value: (isinstance(value, str), value))


class FinetuneDataModule(L.LightningDataModule):
    """The training data of one run.

    Args:
        data: the data config (source, format, field names, templates, lengths, batch size).
        tokenizer: the backbone's tokenizer.
        task: ``causal_lm`` (any format) or ``sequence_classification`` (format classification).
        seed: the training seed; it orders the training stream only (not the calibration subset).
        calibration: the calibration subset's size, batch size and seed.
        base_dir: where relative data paths are resolved (the original working directory).
    """

    def __init__(
        self,
        data: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
        task: str = CAUSAL_LM,
        seed: int = 0,
        calibration: CalibrationConfig | None = None,
        base_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        check_format(data)
        if task not in TASKS:
            raise ConfigError(f"model.task={task!r} is not a known task; choose one of {', '.join(TASKS)}")
        if task == SEQUENCE_CLASSIFICATION and data.format != "classification":
            raise ConfigError(
                f"model.task=sequence_classification needs data.format=classification, not {data.format!r}"
            )
        if data.packing and task != CAUSAL_LM:
            raise ConfigError("data.packing=true applies to causal_lm only; set data.packing=false")
        pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if pad_token_id is None:
            raise ConfigError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token")
        self.cfg = data
        self.tokenizer = tokenizer
        self.task = task
        self.seed = seed
        self.calibration_cfg = calibration or CalibrationConfig()
        self.base_dir = base_dir
        self.collator = PadCollator(pad_token_id)
        self._examples: list[TokenizedExample] | None = None
        self._sequences: list[TokenizedExample] = []
        self._test: RowTable | None = None
        self._val: RowTable | None = None
        self._val_examples: list[TokenizedExample] = []
        self._labels: list[str | int] | None = None

    # -- loading -------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Load, validate and tokenise both splits (once; later calls do nothing)."""
        if self._examples is not None:
            return
        cfg = self.cfg
        train = load_rows(
            cfg.train,
            key="data.train",
            base_dir=self.base_dir,
            hf_config=cfg.hf_config,
            hf_split=cfg.hf_split,
        ).head(cfg.max_train_samples)
        if not train.rows:
            raise DataError(f"data.train: '{cfg.train}' holds no rows")
        if cfg.val:
            self._val = load_rows(cfg.val, key="data.val", base_dir=self.base_dir, hf_config=cfg.hf_config,
                                  hf_split=HF_VALIDATION_SPLIT)
        elif cfg.val_fraction > 0:
            train, self._val = train.split(cfg.val_fraction, cfg.split_seed)
        if cfg.test:
            self._test = load_rows(
                cfg.test,
                key="data.test",
                base_dir=self.base_dir,
                hf_config=cfg.hf_config,
                hf_split=HF_TEST_SPLIT,
            )
        held = [table for table in (self._val, self._test) if table is not None]
        if cfg.format == "classification":
            self._labels = sorted_labels([row.label for row in self._classification_rows(train)])
            for table in held:
                self._check_labels(table)
        else:
            for table in held:
                self._render_causal(table)  # fail now, naming file and line, not at evaluation time
        self._examples = self._tokenize(train)
        self._val_examples = self._tokenize(self._val) if self._val is not None and self._val.rows else []
        self._sequences = pack_examples(self._examples, cfg.max_length) if cfg.packing else self._examples

    def _classification_rows(self, table: RowTable) -> list[ClassificationRow]:
        return [classification_row(row, table.location(i), self.cfg) for i, row in enumerate(table.rows)]

    def _render_causal(self, table: RowTable) -> list[list[Segment]]:
        return [
            causal_segments(row, table.location(i), self.cfg, self.tokenizer)
            for i, row in enumerate(table.rows)
        ]

    def _check_labels(self, table: RowTable) -> None:
        known = set(self._labels or [])
        for i, example in enumerate(self._classification_rows(table)):
            if example.label not in known:
                raise DataError(
                    f"{table.location(i)}: label {example.label!r} does not occur in data.train "
                    f"(labels: {', '.join(map(str, self._labels or []))})"
                )

    def _tokenize(self, table: RowTable) -> list[TokenizedExample]:
        if self.task == CAUSAL_LM:
            add_special_tokens = not uses_chat_template(self.cfg, self.tokenizer)
            examples = tokenize_causal(
                self._render_causal(table), self.tokenizer, self.cfg.max_length, add_special_tokens
            )
            if examples and all(all(label == IGNORE_INDEX for label in ex["labels"]) for ex in examples):
                raise DataError(
                    f"every label of {self.cfg.train} is masked: at data.max_length={self.cfg.max_length} no"
                    " completion token survives truncation (only completions are trained on); raise data.max_length"
                )
            return examples
        rows = self._classification_rows(table)
        label_to_id = {label: index for index, label in enumerate(self._labels or [])}
        pairs = [row.text_pair for row in rows] if self.cfg.text_pair_field else None
        ids = [label_to_id[row.label] for row in rows]
        return tokenize_classification(
            [row.text for row in rows], pairs, ids, self.tokenizer, self.cfg.max_length
        )

    def _require_setup(self) -> list[TokenizedExample]:
        if self._examples is None:
            raise RuntimeError("FinetuneDataModule.setup() must run before its data is used")
        return self._examples

    # -- public accessors ----------------------------------------------------------------------

    @property
    def label_names(self) -> list[str] | None:
        """Class names in class-id order (sorted train labels), for sizing a head; None unless classification."""
        self._require_setup()
        return None if self._labels is None else [str(label) for label in self._labels]

    @property
    def stats(self) -> DataStats:
        """Counts over the tokenised training examples (cheap: one pass over the token lists)."""
        examples = self._require_setup()
        supervised = None
        if self.task == CAUSAL_LM:
            supervised = sum(label != IGNORE_INDEX for example in examples for label in example["labels"])
        return DataStats(
            num_examples=len(examples),
            num_sequences=len(self._sequences),
            num_tokens=sum(len(example["input_ids"]) for example in examples),
            num_supervised_tokens=supervised,
        )

    def test_rows(self) -> list[dict[str, Any]]:
        """The raw rows of ``data.test`` (validated at setup); empty when ``data.test`` is null."""
        self._require_setup()
        return [] if self._test is None else list(self._test.rows)

    def validation_loader(self, batch_size: int) -> DataLoader | None:
        """The validation examples (``data.val`` or the rows held out of ``data.train``), tokenised like
        training, in file order; None when the run has no validation split."""
        self._require_setup()
        if not self._val_examples:
            return None
        return DataLoader(self._val_examples, batch_size=batch_size, shuffle=False, collate_fn=self.collator)

    def _data_parallel_position(self) -> tuple[int, int]:
        """(world size, rank) from the attached Trainer; (1, 0) without one."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        """Infinite per-rank batches from `StepSampler`, resuming after the batches already consumed.

        ``start_batch = trainer.global_step * accumulate_grad_batches``, read when Lightning asks
        for the loader, i.e. after a checkpoint has been restored.
        """
        self._require_setup()
        world_size, rank = self._data_parallel_position()
        start_batch = (
            0 if self.trainer is None else self.trainer.global_step * self.trainer.accumulate_grad_batches
        )
        sampler = StepSampler(
            len(self._sequences),
            self.cfg.batch_size,
            seed=self.seed,
            world_size=world_size,
            rank=rank,
            start_batch=start_batch,
        )
        # its own generator: creating the iterator must not draw from the global RNG, or a resumed
        # run's dropout masks would be one draw off the uninterrupted run's
        return DataLoader(
            self._sequences, batch_sampler=sampler, collate_fn=self.collator, num_workers=self.cfg.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def calibration_dataloader(self, world_size: int | None = None, rank: int | None = None) -> DataLoader:
        """This rank's shard of the fixed calibration subset (unpacked examples, fixed order).

        ``world_size``/``rank`` default to the attached Trainer's (1 and 0 without one).
        """
        examples = self._require_setup()
        default_world_size, default_rank = self._data_parallel_position()
        return calibration_dataloader(
            examples,
            self.calibration_cfg,
            self.collator,
            world_size=default_world_size if world_size is None else world_size,
            rank=default_rank if rank is None else rank,
        )
