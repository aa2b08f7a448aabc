"""Sweep figures: the budget–accuracy plot per backbone and the rank heatmap per allocating method,
plus the export of tables and figures to W&B.

Figures are drawn on matplotlib's Agg canvas (no pyplot), like `ctrlora.plots`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from matplotlib.figure import Figure

from ctrlora.evaluation.aggregate import (
    BASE_LABEL,
    REFERENCE_METHOD,
    Table,
    TableRow,
    flat_rows,
    markdown_table,
)
from ctrlora.plots import rank_heatmap


def budget_accuracy_plot(table: Table, path: Path) -> Path | None:
    """Average score (percent, ± std over seeds) against trainable parameters, one line per method;
    the base model as a dashed horizontal line. None, and no file, when no method row has an average
    (every run scored only some of the columns, e.g. one run per task)."""
    methods = dict.fromkeys(row.method for row in table.rows if row.method != BASE_LABEL)
    lines = {
        method: sorted(
            (row.trainable_params, row.avg)
            for row in table.rows
            if row.method == method and row.trainable_params is not None and row.avg is not None
        )
        for method in methods
    }
    if not any(lines.values()):
        return None
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axes = figure.add_subplot()
    for method, points in lines.items():
        if points:
            axes.errorbar(
                [x for x, _ in points],
                [100 * cell.mean for _, cell in points],
                yerr=[100 * (cell.std or 0.0) for _, cell in points],
                marker="o",
                capsize=3,
                label=method,
            )
    base = next((row for row in table.rows if row.method == BASE_LABEL and row.avg is not None), None)
    if base is not None:
        axes.axhline(100 * base.avg.mean, color="grey", linestyle="--", label="base")
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters")
    axes.set_ylabel("average score (%)")
    axes.set_title(f"{table.model}: budget vs accuracy")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def run_ranks(row: TableRow) -> dict[str, int] | None:
    """The per-module ranks of the row's lowest-seed run, from the allocation.json it wrote
    (``modules.<name>.rank``); None for a run without one (a method that allocates nothing)."""
    run = min(row.runs, key=lambda record: record.seed)
    allocation_file = run.path.parent / "allocation.json"
    if not allocation_file.exists():
        return None
    modules = json.loads(allocation_file.read_text()).get("modules") or {}
    return {name: int(module["rank"]) for name, module in modules.items()} or None


def rank_heatmaps(table: Table, out_dir: Path) -> list[Path]:
    """One heatmap (layers × module types) per (method, budget) row whose runs record an allocation."""
    paths = []
    for row in table.rows:
        ranks = run_ranks(row) if row.runs else None
        if ranks:
            name = re.sub(r"[^\w.-]+", "_", f"ranks-{table.model}-{row.method}-{row.budget}".replace("=", "")) + ".png"
            title = f"{row.method} {row.budget}: ranks"
            paths.append(rank_heatmap(ranks, out_dir / name, title=title))
    return paths


def log_to_wandb(
    tables: list[Table], figures: list[Path], project: str, group: str | None, references: tuple[str, ...] = (REFERENCE_METHOD,)
) -> None:
    """The tables (as W&B Tables and markdown, paired with `references` as in results.md) and figures in
    one W&B run (offline unless WANDB_MODE says)."""
    import wandb

    run = wandb.init(
        project=project, group=group, job_type="aggregate", mode=os.environ.get("WANDB_MODE", "offline")
    )
    for table in tables:
        headers, rows = flat_rows(table)
        run.log({f"results/{table.model}": wandb.Table(columns=headers, data=rows)})
        run.summary[f"results_markdown/{table.model}"] = markdown_table(table, references)
    run.log({f"figures/{path.stem}": wandb.Image(str(path)) for path in figures})
    run.finish()
