"""Run a comparison study: per task and variant, tune on validation, select, then the seed runs.

    python scripts/study.py experiments/nlu_minilm/study.yaml              # two (variant, task) pairs at a time
    python scripts/study.py experiments/nlu_minilm/study.yaml --jobs 1     # one at a time, all cores each
    python scripts/aggregate.py experiments/nlu_minilm/runs/seeds --variants  # the table
    python scripts/study.py experiments/nlu_minilm/study.yaml --keep-from /elsewhere/experiments/nlu_minilm/runs
        # copy the files git keeps from a study running in another checkout (a worktree held at one commit)
    python scripts/study.py experiments/nlu_minilm/study.yaml --report     # what each pair selected, and the run time

Rerunning the same command finishes an interrupted study (every run is started with resume=true).
See ctrlora/study.py for the study file and the steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from ctrlora.errors import ConfigError
from ctrlora.study import keep_from, load_study, run_study
from ctrlora.study_report import study_report

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="the study file (YAML)")
    parser.add_argument("--jobs", type=int, default=2, help="(variant, task) pairs run at once")
    parser.add_argument("--keep-from", type=Path, default=None, metavar="RUNS",
                        help="copy the files git keeps from another checkout's study output into this one's, then stop")
    parser.add_argument("--report", action="store_true",
                        help="print each pair's selected settings, validation score and run time (markdown), then stop")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study)
        if args.report:
            print(study_report(study, ROOT, args.jobs), end="")
            return 0
    except ConfigError as error:
        print(f"ConfigError: {error}", file=sys.stderr)
        return 2
    if args.keep_from is not None:
        copied = keep_from(args.keep_from, ROOT / study.out, study.out, ROOT)
        print(f"{copied} files from {args.keep_from} -> {study.out}")
        return 0
    records = run_study(study, args.jobs, ROOT, Console(soft_wrap=True))
    failed = [r for r in records if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
