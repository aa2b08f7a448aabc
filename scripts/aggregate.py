"""Turn a sweep's results into the paper-style tables and figures.

    python scripts/aggregate.py runs/                # -> runs/aggregate/{results.md,results.csv,*.png}
    python scripts/aggregate.py multirun/2025-01-01_12-00-00 --out tables --wandb --project ctrlora
    python scripts/aggregate.py experiments/nlu_minilm/runs/seeds --variants --paired-with lora,sensitivity_lora
    python scripts/aggregate.py experiments/nlu_minilm/runs/seeds --variants --metrics accuracy   # one column per task

Reads every ``results.json`` under ROOT; writes per backbone a markdown table (methods ×
benchmarks, mean ± std over seeds in percent, base row first, best per column in bold), the same
numbers as CSV (fractions), the paired differences to each ``--paired-with`` row (default: lora) with
95% t-intervals, the budget–accuracy plot, and a rank heatmap per allocating method
(from its ``allocation.json``). ``--wandb`` logs the tables and figures to W&B (offline unless
WANDB_MODE says otherwise). See ctrlora/evaluation/aggregate.py for the statistics.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctrlora.evaluation.aggregate import (
    REFERENCE_METHOD,
    build_tables,
    collect_runs,
    keep_metrics,
    markdown_table,
    write_csv,
)
from ctrlora.evaluation.figures import budget_accuracy_plot, log_to_wandb, rank_heatmaps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path, help="folder searched for results.json files")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: ROOT/aggregate)")
    parser.add_argument(
        "--variants", action="store_true", help="one row per folder under ROOT (seed=* folders merged): ablations"
    )
    parser.add_argument(
        "--paired-with", type=lambda text: text.split(","), default=None, metavar="ROW[,ROW...]",
        help="row labels (comma-separated) to pair every other row with, seed by seed (default: lora, where present)",
    )
    parser.add_argument(
        "--metrics", type=lambda text: text.split(","), default=None, metavar="METRIC[,METRIC...]",
        help="only these metrics' columns (e.g. accuracy; default: every metric the runs report)",
    )
    parser.add_argument("--wandb", action="store_true", help="also log the tables and figures to W&B")
    parser.add_argument("--project", default="ctrlora", help="W&B project (with --wandb)")
    parser.add_argument("--group", default=None, help="W&B group (with --wandb)")
    args = parser.parse_args(argv)

    records = collect_runs(args.root, variants=args.variants)
    if not records:
        print(f"no evaluated results.json under {args.root}", file=sys.stderr)
        return 1
    if args.metrics:
        try:
            records = keep_metrics(records, args.metrics)
        except ValueError as error:
            print(f"--metrics: {error}", file=sys.stderr)
            return 2
    out = args.out or args.root / "aggregate"
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(records)
    labels = {row.method for table in tables for row in table.rows}
    if unknown := [label for label in args.paired_with or [] if label not in labels]:
        print(f"--paired-with: no row labelled {unknown} under {args.root}; rows: {sorted(labels)}", file=sys.stderr)
        return 2
    references = tuple(args.paired_with or [REFERENCE_METHOD])
    markdown = "\n".join(markdown_table(table, references) for table in tables)
    (out / "results.md").write_text(markdown)
    write_csv(tables, out / "results.csv")
    figures = []
    for table in tables:
        if plot := budget_accuracy_plot(table, out / f"budget_accuracy-{table.model}.png"):
            figures.append(plot)
        figures += rank_heatmaps(table, out)
    if args.wandb:
        log_to_wandb(tables, figures, args.project, args.group, references)
    print(markdown)
    print(f"{len(records)} runs -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
