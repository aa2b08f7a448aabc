"""How well does K-FAC's quadratic form measure a trained adapter update? One run dir in, JSON out.

    python scripts/curvature_along_update.py experiments/nlu_minilm/runs/ctr_study/<setting>/seed=0

Along the trained update D = s·BA of every adapted module (jointly), on the run's calibration set at
the pretrained weights with the run's trained head (D's starting point), in units of the training
loss (per sequence for a classifier, per token for a causal LM):

- ``exact_ggn``: ``DᵀCD`` with C the exact Gauss–Newton matrix (one JVP per batch,
  `ctrlora.curvature.directional`), the second-order change of the loss (and, for the Fisher,
  twice the KL) along D;
- ``kfac``: ``Σ_l tr(D_lᵀ S_g D_l S_a)·T/N`` with K-FAC factors estimated at the same point
  (block-diagonal: no coupling between modules), the trust region's ``2 × penalty / λ``;
- ``penalty_logged``: the run's last logged penalty ``½‖D‖²_M`` (CTR-LoRA: the metric it trained with,
  estimated at step 0 before the head had trained);
- ``slope``: ``∇Lᵀ D`` at that point.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel

from ctrlora.backbones import load_backbone, load_tokenizer
from ctrlora.config import load_train_config
from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.directional import directional_model
from ctrlora.curvature.estimate import estimate_curvature
from ctrlora.curvature.objectives import tokens_per_loss_term
from ctrlora.data.datamodule import FinetuneDataModule
from ctrlora.peft_layout import ADAPTER, PEFT_PREFIX, lora_layers
from ctrlora.task_types import SEQUENCE_CLASSIFICATION


def measure(run_dir: Path) -> dict[str, float]:
    """The numbers of the module docstring for the run in `run_dir`."""
    cfg = load_train_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    data = FinetuneDataModule(
        cfg.data, tokenizer, task=cfg.model.task, seed=cfg.seed, calibration=cfg.calibration, base_dir=Path.cwd()
    )
    data.setup("fit")
    num_labels = len(data.label_names) if cfg.model.task == SEQUENCE_CLASSIFICATION else None
    backbone = load_backbone(cfg.model, accelerator="cpu", quantize_4bit=False, num_labels=num_labels)
    model = PeftModel.from_pretrained(backbone, run_dir / "adapter")
    batches = list(data.calibration_dataloader(1, 0))
    layers = lora_layers(model)
    updates, tangents = {}, {}
    with torch.no_grad():
        for name, layer in layers.items():
            B, A = layer.lora_B[ADAPTER].weight, layer.lora_A[ADAPTER].weight
            updates[name] = (layer.scaling[ADAPTER] * B @ A).double()
            tangents[f"{PEFT_PREFIX}{name}.lora_B.{ADAPTER}.weight"] = B.clone()
            B.zero_()  # the pretrained weights (with the trained head); D enters as B's tangent
    scale = tokens_per_loss_term(batches, torch.device("cpu"))
    exact = directional_model(model, batches, tangents)
    factors = estimate_curvature(model, batches, [PEFT_PREFIX + name for name in layers], CurvatureConfig(), progress=False)
    kfac = 0.0
    for name, delta in updates.items():
        curvature = factors[PEFT_PREFIX + name]
        kfac += float(torch.trace(delta.T @ curvature.g.dense().double() @ delta @ curvature.a.dense().double()))
    return {
        "tokens_per_loss_term": scale,
        "slope": exact.slope * scale,
        "exact_ggn": exact.curvature * scale,
        "kfac": kfac * scale,
        "exact_over_kfac": exact.curvature / kfac,
        "penalty_logged": last_logged_penalty(run_dir / "metrics.csv"),
    }


def last_logged_penalty(metrics: Path) -> float | None:
    """The last ``method/penalty`` in a run's metrics.csv (None for methods without a trust region)."""
    rows = [row for row in csv.DictReader(metrics.open()) if row.get("method/penalty")]
    return float(rows[-1]["method/penalty"]) if rows else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+", help="finished run dirs (adapter/, config.yaml, metrics.csv)")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        print(json.dumps({"run_dir": str(run_dir), **measure(run_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
