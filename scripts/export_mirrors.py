"""Write local mirrors of the paper's benchmarks for ``eval.data_dir`` (run once, with hub access).

    python scripts/export_mirrors.py --out /data/ctrlora-mirrors
    python scripts/export_mirrors.py --out mirrors --tasks mmlu boolq --mmlu-subjects anatomy astronomy

Which dataset, config and splits to fetch is read from lm-eval's own task YAMLs (the ones the
generated tasks ``include:``), so a mirror holds exactly what the stock tasks read, in the
dataset's own schema: ``<out>/<task>/<split>.parquet`` and ``<out>/mmlu/<subject>/<split>.parquet``
(layout: ctrlora/evaluation/mirrors.py). Then evaluate offline with
``eval=paper eval.data_dir=<out>``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import load_dataset

from ctrlora.evaluation.mirrors import SPLIT_KEYS
from ctrlora.evaluation.tasks import MMLU_DIR, STOCK_ROOT, STOCK_TASKS, stock_config

PAPER_TASKS = ("mmlu", "gsm8k", "arc_challenge", "hellaswag", "boolq", "winogrande")


def export_task(stock_yaml: Path, folder: Path) -> None:
    """Every split the stock task names, from its dataset_path/dataset_name, as parquet."""
    stock = stock_config(stock_yaml)
    kwargs = {k: v for k, v in (stock.get("dataset_kwargs") or {}).items() if k != "trust_remote_code"}
    folder.mkdir(parents=True, exist_ok=True)
    for split in dict.fromkeys(stock[key] for key in SPLIT_KEYS if stock.get(key)):
        rows = load_dataset(stock["dataset_path"], stock.get("dataset_name"), split=split, **kwargs)
        rows.to_parquet(folder / f"{split}.parquet")
        print(f"{folder / split}.parquet: {len(rows)} rows")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="the mirror root (eval.data_dir)")
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS), choices=["mmlu", *STOCK_TASKS])
    parser.add_argument("--mmlu-subjects", nargs="+", default=None, help="a subset of MMLU's 57 subjects")
    args = parser.parse_args()
    for task in args.tasks:
        if task != "mmlu":
            export_task(STOCK_ROOT / STOCK_TASKS[task], args.out / task)
            continue
        subjects = args.mmlu_subjects or sorted(
            p.stem.removeprefix("mmlu_") for p in MMLU_DIR.glob("mmlu_*.yaml")
        )
        for subject in subjects:
            export_task(MMLU_DIR / f"mmlu_{subject}.yaml", args.out / "mmlu" / subject)


if __name__ == "__main__":
    main()
