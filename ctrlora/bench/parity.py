"""Parity: LoRA on a sequence classifier through ctrlora vs. a bare transformers + PEFT loop.

    python -m ctrlora.bench.parity                              # wordnet_hypernyms pairs, seeds 0-2
    python -m ctrlora.bench.parity data=fortune_topics trainer.max_steps=200 --seeds 0,1

Both sides read the same JSON-lines files and share every setting: the backbone, LoRA's rank, α,
dropout and target modules with the head trained, AdamW's lr, betas and weight decay, linear
warm-up then cosine decay, gradient clipping, the batch size, the number of steps and the maximum
length. ctrlora runs `train` with ``method=lora``, no validation split and no head warm-up (the bare
loop has neither); the bare loop reads the rows with `json`, tokenises them with the backbone's
tokenizer, builds `LoraConfig(task_type="SEQ_CLS")` itself and shuffles each epoch with its own
generator. The two draw different random numbers, so they agree in distribution over seeds, not
per seed. A third column separates the draw from the training path: the bare loop started from
ctrlora's initial adapters and head and fed ctrlora's batch stream (only dropout's draws differ),
which should track ctrlora seed by seed. Output: ``bench/parity.json`` and ``bench/parity.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_cosine_schedule_with_warmup

from ctrlora.backbones import resolve_source
from ctrlora.bench.runs import plain_update
from ctrlora.config import TrainConfig
from ctrlora.console import quiet_libraries
from ctrlora.data.sources import candidate_paths

DEFAULTS = [  # the sentence-pair setting in which LoRA through ctrlora once stayed at chance
    "model=minilm-l6", "method=lora", "data=wordnet_hypernyms", "optim.lr=2e-3", "data.batch_size=32",
    "trainer.max_steps=150", "eval=local",
]
PARITY = ["data.val_fraction=0", "calibration.head_warmup_steps=0", "trainer.progress_bar=false"]


def read_rows(path: str) -> list[dict[str, Any]]:
    """The JSON lines of a data file (relative paths as ctrlora resolves them)."""
    resolved = next(p for p in candidate_paths(path, Path.cwd()) if p.exists())
    return [json.loads(line) for line in resolved.read_text(encoding="utf-8").splitlines() if line.strip()]


def encode(tokenizer: Any, rows: list[dict[str, Any]], cfg: TrainConfig, label_ids: dict[Any, int]) -> dict[str, Any]:
    data = cfg.data
    pairs = [row[data.text_pair_field] for row in rows] if data.text_pair_field else None
    encoding = tokenizer([row[data.text_field] for row in rows], pairs, truncation=True, max_length=data.max_length)
    return {"features": [dict(zip(encoding.keys(), values, strict=True)) for values in zip(*encoding.values(), strict=True)],
            "labels": [label_ids[row[data.label_field]] for row in rows]}


def batches_of(tokenizer: Any, encoded: dict[str, Any], order: list[int], size: int):
    for start in range(0, len(order), size):
        chosen = order[start : start + size]
        batch = tokenizer.pad([encoded["features"][i] for i in chosen], return_tensors="pt")
        yield batch, torch.tensor([encoded["labels"][i] for i in chosen])


def ctrlora_start(cfg: TrainConfig, run_dir: Path) -> tuple[dict[str, torch.Tensor], Iterator[dict[str, Any]]]:
    """What ctrlora starts training from under `cfg`: the trainable tensors (adapters, head) and the
    training batch stream (assembled as `train` does, nothing trained)."""
    from ctrlora.run import assemble

    run = assemble(cfg, run_dir)
    trainable = {name for name, p in run.model.named_parameters() if p.requires_grad}
    state = {name: value.detach().clone() for name, value in run.model.state_dict().items() if name in trainable}
    return state, iter(run.datamodule.train_dataloader())


def own_batches(tokenizer: Any, encoded: dict[str, Any], size: int, seed: int) -> Iterator[dict[str, Any]]:
    """Each epoch a fresh permutation from one seeded generator, as a hand-written loop does."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(encoded["labels"]), generator=generator).tolist()
        for batch, targets in batches_of(tokenizer, encoded, order, size):
            yield {**batch, "labels": targets}


def bare_loop_accuracy(cfg: TrainConfig, seed: int, start: tuple | None = None) -> dict[str, Any]:
    """Train LoRA with transformers + PEFT alone under `cfg`'s settings; test accuracy and the losses.
    `start` (from `ctrlora_start`): begin from those trainable tensors and that batch stream instead
    of the loop's own draws."""
    torch.manual_seed(seed)
    source = resolve_source(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    train_rows, test_rows = read_rows(cfg.data.train), read_rows(cfg.data.test)
    labels = sorted({row[cfg.data.label_field] for row in train_rows}, key=lambda v: (isinstance(v, str), v))
    label_ids = {label: index for index, label in enumerate(labels)}
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=len(labels))
    model = get_peft_model(model, LoraConfig(
        task_type="SEQ_CLS", r=cfg.budget.rank, lora_alpha=cfg.method.alpha, lora_dropout=cfg.method.dropout,
        target_modules=list(cfg.model.target_modules),
    ))
    if start is not None:
        missing = set(start[0]) - set(model.state_dict())
        assert not missing, f"ctrlora's trainable tensors have no counterpart in the bare model: {sorted(missing)[:3]}"
        model.load_state_dict(start[0], strict=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    steps = cfg.trainer.max_steps
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.optim.warmup_ratio * steps), steps)
    batches = start[1] if start is not None else own_batches(tokenizer, encode(tokenizer, train_rows, cfg, label_ids),
                                                              cfg.data.batch_size, seed)
    model.train()
    losses = []
    for batch in itertools.islice(batches, steps):
        loss = model(**batch).loss
        plain_update(loss, params, optimizer, scheduler, cfg.trainer.gradient_clip_val)
        losses.append(float(loss.detach()))
    test = encode(tokenizer, test_rows, cfg, label_ids)
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch, targets in batches_of(tokenizer, test, list(range(len(test["labels"]))), cfg.eval.batch_size):
            correct += int((model(**batch).logits.argmax(-1) == targets).sum())
    trainable = sum(p.numel() for p in params)
    return {"accuracy": correct / len(test["labels"]), "losses": losses, "trainable_params": trainable}


def compose_train(overrides: list[str]) -> TrainConfig:
    from hydra import compose, initialize_config_dir

    from ctrlora.bench import CONF_DIR
    from ctrlora.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def parity(overrides: list[str], seeds: list[int], out_dir: Path) -> dict[str, Any]:
    """Both sides for each seed; writes parity.json and parity.md under `out_dir`."""
    from ctrlora.run import train

    rows = []
    for seed in seeds:
        composed = compose_train([*DEFAULTS, *overrides, *PARITY, f"seed={seed}", f"run_dir={out_dir / 'parity' / f'seed{seed}'}", "overwrite=true"])
        results = train(composed)
        cfg: TrainConfig = OmegaConf.to_object(composed)
        bare = bare_loop_accuracy(cfg, seed)
        shared = bare_loop_accuracy(cfg, seed, ctrlora_start(cfg, out_dir / "parity" / f"start{seed}"))
        ctr_accuracy = results["eval"][cfg.data.name]["accuracy"]["value"]
        rows.append({"seed": seed, "ctrlora": ctr_accuracy, "bare": bare["accuracy"], "bare_shared": shared["accuracy"],
                     "ctrlora_params": results["run"]["budget"]["trainable_params"], "bare_params": bare["trainable_params"],
                     "ctrlora_final_loss": results["train"]["final_loss"], "bare_final_loss": bare["losses"][-1],
                     "bare_shared_final_loss": shared["losses"][-1]})
    summary = {"overrides": [*DEFAULTS, *overrides, *PARITY], "seeds": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "parity.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "parity.md").write_text(parity_markdown(summary))
    return summary


def parity_markdown(summary: dict[str, Any]) -> str:
    rows = summary["seeds"]
    sides = ("ctrlora", "bare", "bare_shared")
    lines = ["# LoRA through ctrlora vs a bare transformers + PEFT loop", "", "`" + " ".join(summary["overrides"]) + "`", "",
             "Test accuracy (%) and final training loss; *bare, ctrlora's start*: the bare loop from ctrlora's initial",
             "adapters, head and batch stream.", "",
             "| seed | ctrlora | bare loop | bare, ctrlora's start | ctrlora loss | bare loss | bare, ctrlora's start: loss |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        accuracies = " | ".join(f"{100 * row[side]:.1f}" for side in sides)
        losses = " | ".join(f"{row[f'{side}_final_loss']:.3f}" for side in sides)
        lines.append(f"| {row['seed']} | {accuracies} | {losses} |")
    means = []
    for side in sides:
        values = [100 * row[side] for row in rows]
        means.append(f"{statistics.fmean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""))
    lines.append(f"| mean ± std | {' | '.join(means)} | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="conf/train.yaml overrides on top of the defaults")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("bench"))
    args = parser.parse_args(argv)
    quiet_libraries()
    summary = parity(args.overrides, [int(s) for s in args.seeds.split(",")], args.out)
    print(parity_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
