"""Sweep results -> the paper-style tables (docs/EVALUATION.md §2): methods × benchmarks, mean ± std over
seeds, the base row first, the best per column in bold; as markdown and CSV.

A table holds the runs of one backbone. A row is one (method, budget) over its seeds; a column
is one reported (task, metric) of the runs' ``eval`` sections. Each cell is the mean and the
sample standard deviation (n - 1 in the denominator; none for a single seed) over the runs;
``avg`` is, per run, the mean over the columns, then mean ± std over the runs. The base row is
the backbone's cached row (identical in every run of one protocol; distinct rows are averaged).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from scipy import stats

from ctrlora.evaluation.classification import PREDICTED_CLASSES
from ctrlora.evaluation.sections import is_limited, task_rows

METHOD_ORDER = (  # the reference rows bracket the adapters: frozen encoder first, full fine-tuning last
    "head_only",
    "lora",
    "qlora",
    "dora",
    "pissa",
    "loraplus",
    "adalora",
    "sensitivity_lora",
    "cg_lora",
    "ctrlora",
    "full_ft",
)
BASE_LABEL = "base"
Column = tuple[str, str]  # (task, metric)


@dataclass(frozen=True)
class RunRecord:
    """What the tables need from one results.json."""

    path: Path
    model: str
    method: str
    seed: int
    budget: str  # "ratio=0.001" or "r=8"
    trainable_params: int | None
    scores: dict[Column, float]
    base_scores: dict[Column, float]
    single_class: bool = False  # a classifier that predicted one class for a whole test split
    limited: bool = False  # scored with eval.limit: a part of the test split


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float | None  # None for a single value
    n: int


@dataclass
class TableRow:
    method: str
    budget: str
    trainable_params: float | None
    runs: list[RunRecord]
    cells: dict[Column, Cell] = field(default_factory=dict)
    avg: Cell | None = None


@dataclass
class Table:
    model: str
    columns: list[Column]
    rows: list[TableRow]  # the base row first

    def column_label(self, column: Column) -> str:
        task, metric = column
        metrics_of_task = [m for t, m in self.columns if t == task]
        return task if len(metrics_of_task) == 1 else f"{task} ({metric.partition(',')[2] or metric})"

    def best(self, column: Column | None) -> float | None:
        """The highest mean in a column (``None`` column: the avg)."""
        means = [cell.mean for cell in (row_cell(row, column) for row in self.rows) if cell is not None]
        return max(means) if means else None


def row_cell(row: TableRow, column: Column | None) -> Cell | None:
    return row.avg if column is None else row.cells.get(column)


def load_run(path: Path) -> RunRecord | None:
    """A RunRecord from a results.json; None when it has no evaluated task."""
    results = json.loads(path.read_text())
    section = results.get("eval") or {}
    scores = flatten(task_rows(section))
    if not scores:
        return None
    run = results["run"]
    budget = run.get("budget") or {}
    if budget.get("ratio") is not None:
        label = f"ratio={budget['ratio']:g}"
    else:  # reference rows (head_only, full_ft) have no rank budget
        label = f"r={budget['rank']}" if budget.get("rank") is not None else "–"
    return RunRecord(
        path=path,
        model=run["model"],
        method=run["method"],
        seed=int(run.get("seed", 0)),
        budget=label,
        trainable_params=budget.get("trainable_params"),
        scores=scores,
        base_scores=flatten(section.get("base", {})),
        single_class=any(
            metrics.get(PREDICTED_CLASSES, {}).get("value") == 1 for metrics in task_rows(section).values()
        ),
        limited=is_limited(section),
    )


def flatten(rows: dict[str, Any]) -> dict[Column, float]:
    """``(task, metric) -> value`` of the scores (the count of predicted classes is a diagnostic, not a score)."""
    return {
        (task, metric): float(value["value"])
        for task, metrics in rows.items()
        for metric, value in metrics.items()
        if metric != PREDICTED_CLASSES
    }


def collect_runs(root: Path, variants: bool = False) -> list[RunRecord]:
    """Every evaluated run under `root` (``**/results.json``), in path order.

    ``variants``: runs of one method in different folders are different rows, labelled by the folder
    (its path under `root`, ``seed=*`` parts and parts named like the run's task left out), e.g.
    ``ctrlora (lambda0=0.05,cosine)``: how an ablation study lays out its settings
    (``scripts/study.py`` writes ``<task>/<variant>/seed=<s>``).
    """
    records = []
    for path in sorted(Path(root).rglob("results.json")):
        record = load_run(path)
        if record is None:
            continue
        tasks = {task for task, _ in record.scores}
        parts = path.parent.relative_to(root).parts
        variant = "/".join(part for part in parts if not part.startswith("seed=") and part not in tasks)
        if variants and variant not in ("", record.method):
            record = replace(record, method=f"{record.method} ({variant})")
        records.append(record)
    return records


def keep_metrics(records: list[RunRecord], metrics: list[str]) -> list[RunRecord]:
    """The records with the columns of the named metrics alone (e.g. ``accuracy``: one column per task),
    their base scores too; a name no run reports raises ValueError with the names they do report."""
    reported = {metric for record in records for _, metric in record.scores}
    if unknown := sorted(set(metrics) - reported):
        raise ValueError(f"no run reports the metrics {unknown}; they report {sorted(reported)}")

    def kept(scores: dict[Column, float]) -> dict[Column, float]:
        return {column: value for column, value in scores.items() if column[1] in metrics}

    return [replace(record, scores=kept(record.scores), base_scores=kept(record.base_scores)) for record in records]


def summarize(values: list[float]) -> Cell:
    """Mean and sample standard deviation (None for one value)."""
    return Cell(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def build_tables(records: list[RunRecord]) -> list[Table]:
    """One table per backbone, rows ordered: base, then METHOD_ORDER (others alphabetically), by budget."""
    tables = []
    for model in sorted({record.model for record in records}):
        runs = [record for record in records if record.model == model]
        columns = list(dict.fromkeys(column for record in runs for column in record.scores))
        groups: dict[tuple[str, str], list[RunRecord]] = {}
        for record in runs:
            groups.setdefault((record.method, record.budget), []).append(record)
        rows = []
        for (method, budget), members in groups.items():
            params = [r.trainable_params for r in members if r.trainable_params is not None]
            row = TableRow(method, budget, statistics.fmean(params) if params else None, members)
            fill_cells(row, [r.scores for r in members], columns)
            rows.append(row)
        rows.sort(key=lambda row: (method_rank(row.method), row.trainable_params or 0.0, row.budget))
        base_rows = list(
            {repr(sorted(r.base_scores.items())): r.base_scores for r in runs if r.base_scores}.values()
        )
        if base_rows:
            base = TableRow(BASE_LABEL, "", None, [])
            fill_cells(base, base_rows, columns)
            rows.insert(0, base)
        tables.append(Table(model, columns, rows))
    return tables


def fill_cells(row: TableRow, score_sets: list[dict[Column, float]], columns: list[Column]) -> None:
    for column in columns:
        values = [scores[column] for scores in score_sets if column in scores]
        if values:
            row.cells[column] = summarize(values)
    complete = [scores for scores in score_sets if all(column in scores for column in columns)]
    if complete:
        row.avg = summarize([statistics.fmean(scores[column] for column in columns) for scores in complete])


def format_cell(cell: Cell | None, best: float | None) -> str:
    """Percent with one decimal, ``mean ± std``; bold when the cell holds the column's best mean."""
    if cell is None:
        return "–"
    text = f"{100 * cell.mean:.1f}" + (f" ± {100 * cell.std:.1f}" if cell.std is not None else "")
    is_best = best is not None and math.isclose(cell.mean, best, rel_tol=0.0, abs_tol=1e-12)
    return f"**{text}**" if is_best else text


REFERENCE_METHOD = "lora"  # the row every other is paired with unless told otherwise


def markdown_table(table: Table, references: tuple[str, ...] = (REFERENCE_METHOD,)) -> str:
    """The table, then per row label in `references` the paired differences of every other row to it."""
    headers = [
        "method",
        "budget",
        "trainable params",
        "seeds",
        *map(table.column_label, table.columns),
        "avg",
    ]
    lines = [f"### {table.model}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in table.rows:
        params = params_label(row)
        cells = [format_cell(row_cell(row, column), table.best(column)) for column in [*table.columns, None]]
        seeds = str(len(row.runs)) if row.runs else "–"
        collapsed = sum(run.single_class for run in row.runs)
        limited = sum(run.limited for run in row.runs)
        method = row.method + (f" ⚠ one class in {collapsed}/{len(row.runs)} seeds" if collapsed else "")
        method += f" (limited eval in {limited}/{len(row.runs)} seeds)" if limited else ""
        lines.append("| " + " | ".join([method, row.budget or "–", params, seeds, *cells]) + " |")
    return "\n".join(lines) + "\n" + "".join(paired_markdown(table, reference) for reference in references)


def params_label(row: TableRow) -> str:
    """The row's trainable parameters: one number, or ``min–max`` where its runs differ (a head per
    task, or ranks allocated per task), never a mean that no run trained."""
    params = sorted({run.trainable_params for run in row.runs if run.trainable_params is not None})
    if not params:
        return "–"
    return f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,}–{params[-1]:,}"


def flat_rows(table: Table) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of a table as plain values: raw fractions (not percent), mean and std per
    column, None where there is no value."""
    labels = [*map(table.column_label, table.columns), "avg"]
    headers = ["model", "method", "budget", "trainable_params", "seeds"] + [
        f"{label} {stat}" for label in labels for stat in ("mean", "std")
    ]
    rows = []
    for row in table.rows:
        values: list[Any] = []
        for column in [*table.columns, None]:
            cell = row_cell(row, column)
            values += [None, None] if cell is None else [cell.mean, cell.std]
        params = None if row.trainable_params is None else round(row.trainable_params)
        rows.append([table.model, row.method, row.budget, params, len(row.runs), *values])
    return headers, rows


def write_csv(tables: list[Table], path: Path) -> None:
    """Every table's `flat_rows`, one after the other (a blank line between backbones)."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        for index, table in enumerate(tables):
            headers, rows = flat_rows(table)
            if index:
                writer.writerow([])
            writer.writerows([headers, *rows])


@dataclass(frozen=True)
class PairedDifference:
    """``mean_s (score_method(s) − score_reference(s))`` over the seeds both rows ran, with its 95% interval."""

    mean: float
    half_width: float | None  # t_{0.975, n−1} · sd / √n; None for one seed
    n: int


def paired_difference(method_scores: dict[int, float], reference_scores: dict[int, float]) -> PairedDifference | None:
    """The paired t-interval of the per-seed differences on the seeds both have (None without any)."""
    seeds = sorted(method_scores.keys() & reference_scores.keys())
    if not seeds:
        return None
    differences = [method_scores[seed] - reference_scores[seed] for seed in seeds]
    if len(differences) == 1:
        return PairedDifference(differences[0], None, 1)
    half = stats.t.ppf(0.975, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return PairedDifference(statistics.fmean(differences), float(half), len(differences))


def reference_row(table: Table, row: TableRow, reference: str) -> TableRow | None:
    """The row labelled `reference` that a row is paired with: at the same budget, else the only one."""
    candidates = [other for other in table.rows if other.method == reference and other.runs]
    same_budget = [other for other in candidates if other.budget == row.budget]
    return (same_budget or (candidates if len(candidates) == 1 else [None]))[0]


def seed_scores(row: TableRow, column: Column) -> dict[int, float]:
    return {run.seed: run.scores[column] for run in row.runs if column in run.scores}


def paired_markdown(table: Table, reference: str = REFERENCE_METHOD) -> str:
    """Per method, the paired difference to the `reference` row on every column, in points:
    ``+1.2 [−0.4, +2.8] (n=5)``; empty when the table has no such row."""
    lines = []
    for row in table.rows:
        paired_with = reference_row(table, row, reference)
        if paired_with is None or paired_with is row or not row.runs:
            continue
        cells = []
        for column in table.columns:
            difference = paired_difference(seed_scores(row, column), seed_scores(paired_with, column))
            cells.append(format_difference(difference))
        lines.append("| " + " | ".join([row.method, row.budget or "–", *cells]) + " |")
    if not lines:
        return ""
    headers = ["method", "budget", *map(table.column_label, table.columns)]
    title = f"Paired difference to {reference} over the same seeds (points, mean [95% t-interval])"
    return "\n".join(["", title, "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers), *lines]) + "\n"


def format_difference(difference: PairedDifference | None) -> str:
    if difference is None:
        return "–"
    mean = f"{100 * difference.mean:+.1f}"
    if difference.half_width is None:
        return f"{mean} (n=1)"
    low, high = 100 * (difference.mean - difference.half_width), 100 * (difference.mean + difference.half_width)
    return f"{mean} [{low:+.1f}, {high:+.1f}] (n={difference.n})"
