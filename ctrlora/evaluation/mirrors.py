"""Local mirrors of the benchmarks, each in its own Hugging Face schema (docs/EVALUATION.md §1).

Layout under ``eval.data_dir``: one folder per lm-eval task, one file per split, named as the
stock task config names its splits (``scripts/export_mirrors.py`` writes exactly this)::

    mmlu/<subject>/{dev,test}.parquet          cais/mmlu <subject>: question, subject, choices[4],
                                               answer (int)
    gsm8k/{train,test}.parquet                 openai/gsm8k main: question, answer ("... #### 42")
    arc_challenge/{train,validation,test}.parquet
                                               allenai/ai2_arc ARC-Challenge: id, question,
                                               choices {text[], label[]}, answerKey
    hellaswag/{train,validation}.parquet       Rowan/hellaswag: ind, activity_label, ctx_a, ctx_b, ctx,
                                               endings[4], source_id, split, split_type, label (str)
    boolq/{train,validation}.parquet           aps/super_glue boolq: question, passage, idx, label (int)
    winogrande/{train,validation}.parquet      allenai/winogrande winogrande_xl: sentence, option1, option2,
                                               answer ("1" | "2")

``.jsonl``/``.json`` files may stand in for ``.parquet`` (the test fixtures are jsonl). A mirror
needs the split a task is scored on and, with shots, the split its few-shot examples come from;
other splits may be left out. Note lm-eval's default sampler draws ``shots + 1`` examples (to drop
the scored document if drawn), so a few-shot split needs at least that many rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctrlora.errors import DataError

MIRROR_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}  # suffix -> `datasets` builder
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


@dataclass(frozen=True)
class Mirror:
    """The split files of one mirrored task."""

    folder: Path
    builder: str  # the `datasets` packaged builder that reads the files: json | parquet
    files: dict[str, Path]  # split name -> absolute path


def read_mirror(folder: Path) -> Mirror:
    """List the split files in `folder`; all must share one format."""
    if not folder.is_dir():
        raise DataError(
            f"eval.data_dir: no mirror folder {folder} (write mirrors with scripts/export_mirrors.py)"
        )
    files = {path.stem: path.resolve() for path in sorted(folder.iterdir()) if path.suffix in MIRROR_BUILDERS}
    builders = {MIRROR_BUILDERS[path.suffix] for path in files.values()}
    if not files:
        raise DataError(f"eval.data_dir: {folder} holds no split files ({', '.join(MIRROR_BUILDERS)})")
    if len(builders) > 1:
        raise DataError(
            f"eval.data_dir: {folder} mixes formats ({', '.join(sorted(builders))}); use one per task"
        )
    return Mirror(folder, builders.pop(), files)


def needed_splits(stock: dict[str, Any], num_fewshot: int) -> dict[str, str]:
    """The splits lm-eval reads, by role: ``scored`` (test, else validation) and, with shots,
    ``few-shot`` (fewshot_split, else training, else validation, else test — lm-eval's rule)."""
    scored = stock.get("test_split") or stock.get("validation_split")
    needed = {"scored": scored}
    if num_fewshot > 0:
        needed["few-shot"] = next(
            stock[key]
            for key in ("fewshot_split", "training_split", "validation_split", "test_split")
            if stock.get(key)
        )
    return needed


def mirrored_dataset(stock: dict[str, Any], folder: Path, num_fewshot: int) -> dict[str, Any]:
    """Task-config keys that point the stock task `stock` at the mirror in `folder`.

    The dataset becomes the mirror's `datasets` builder over absolute paths; split keys the
    mirror lacks are set to null (allowed only for splits the evaluation does not read).
    """
    mirror = read_mirror(folder)
    for role, split in needed_splits(stock, num_fewshot).items():
        if split not in mirror.files:
            raise DataError(
                f"eval.data_dir: task {stock['task']!r} reads its {role} documents from split {split!r}, but "
                f"{folder} has no {split}.<{'|'.join(s.lstrip('.') for s in MIRROR_BUILDERS)}> "
                f"(found: {', '.join(mirror.files)})"
            )
    keys: dict[str, Any] = {
        "dataset_path": mirror.builder,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in mirror.files.items()}},
    }
    for key in SPLIT_KEYS:
        if stock.get(key) is not None and stock[key] not in mirror.files:
            keys[key] = None
    return keys
