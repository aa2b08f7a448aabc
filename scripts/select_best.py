"""Each method's best trial of a tuning sweep, by validation score only -> its overrides and seed runs.

    python train.py -m hydra/sweeper=optuna method=ctrlora experiment=nlu_minilm hydra.sweep.dir=tune/ctrlora
    python scripts/select_best.py tune/ctrlora                    # -> tune/ctrlora/selected/*.yaml + commands
    python scripts/select_best.py tune/ --seeds 1,2,3,4,5 --out runs/seeds

(docs/EVALUATION.md §4.1 calls it `scripts/select.py`; a file of that name in scripts/ would stand in for the
standard library's `select`, which `subprocess` imports, in every script run from this folder.)

Writes, per (model, method, data), ``SWEEP_DIR/selected/<model>-<method>-<data>.yaml`` (the trial's
run dir, its validation metric and value, the number of trials, the overrides) and prints the
command that reruns those overrides over the seeds. See ctrlora/evaluation/selection.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ctrlora.evaluation.selection import best_trials, seed_run_command, seed_run_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a tuning sweep's dir (searched for results.json)")
    parser.add_argument("--seeds", default="1,2,3,4,5", help="seeds of the runs at the selected settings (not the tuning seed 0)")
    parser.add_argument("--out", default=None, help="hydra.sweep.dir of the seed runs (default: SWEEP_DIR/seeds)")
    args = parser.parse_args(argv)
    best = best_trials(args.sweep_dir)
    if not best:
        print(f"no finished trial with a validation score under {args.sweep_dir}", file=sys.stderr)
        return 1
    seeds = [int(seed) for seed in args.seeds.split(",")]
    out_dir = args.sweep_dir / "selected"
    out_dir.mkdir(parents=True, exist_ok=True)
    for (model, method, data), (trial, count) in sorted(best.items()):
        record = {
            "run_dir": str(trial.run_dir), "metric": trial.metric, "value": trial.value, "trials": count,
            "overrides": seed_run_overrides(trial),
        }
        (out_dir / f"{model}-{method}-{data}.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        print(f"# {model} / {method} / {data}: best of {count} trials, validation {trial.metric} = {trial.value:.4f}")
        print(seed_run_command(trial, seeds, args.out or str(args.sweep_dir / "seeds")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
