"""Report figures: the per-module rank heatmap and the training loss curve.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend state), so
they work headless and from any thread.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.(.+)$")


def parse_module_name(name: str) -> tuple[int, str]:
    """``(layer index, module path inside the layer)`` from a dotted module name.

    The layer index is the first all-digit component; what follows is the module path, e.g.
    ``model.layers.3.self_attn.q_proj`` -> ``(3, "self_attn.q_proj")``,
    ``base_model.model.model.layers.3.mlp.down_proj`` -> ``(3, "mlp.down_proj")``,
    ``encoder.layer.2.attention.self.query`` -> ``(2, "attention.self.query")``.
    """
    match = _LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(
            f"cannot find a layer index in module name {name!r} (expected '...<layer>.<N>.<module>')"
        )
    return int(match.group(1)), match.group(2)


def rank_grid(ranks: Mapping[str, int]) -> tuple[list[int], list[str], np.ndarray]:
    """``(layers, module types, matrix)`` with ``matrix[i, j]`` the rank of type j in layer i.

    Layers are sorted; types keep their order of first appearance and are labelled by the
    shortest dotted suffix that tells them apart (``q_proj``; BERT's ``attention.output.dense``
    vs ``output.dense``). Cells with no entry (a module that got no adapter) are 0.
    """
    cells: dict[tuple[int, str], int] = {}
    for name, rank in ranks.items():
        cell = parse_module_name(name)
        if cell in cells:
            raise ValueError(f"module {name!r} maps to layer {cell[0]}, type {cell[1]!r}, already taken")
        cells[cell] = int(rank)
    paths = list(dict.fromkeys(path for _, path in cells))
    labels = _short_labels(paths)
    layers = sorted({layer for layer, _ in cells})
    row = {layer: i for i, layer in enumerate(layers)}
    column = {path: j for j, path in enumerate(paths)}
    matrix = np.zeros((len(layers), len(paths)), dtype=np.int64)
    for (layer, path), rank in cells.items():
        matrix[row[layer], column[path]] = rank
    return layers, [labels[path] for path in paths], matrix


def _short_labels(paths: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each path that no other path shares."""
    labels = {}
    for path in paths:
        parts = path.split(".")
        for length in range(1, len(parts) + 1):
            suffix = parts[-length:]
            if all(other.split(".")[-length:] != suffix for other in paths if other != path):
                break
        labels[path] = ".".join(suffix)
    return labels


def rank_heatmap(ranks: Mapping[str, int], path: str | Path, title: str = "LoRA rank per module") -> Path:
    """Save a layers × module-types heatmap of the ranks, every cell annotated, as a PNG."""
    layers, types, matrix = rank_grid(ranks)
    figure = Figure(figsize=(1.5 + 0.9 * len(types), 2.2 + 0.32 * len(layers)), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="viridis", aspect="auto", vmin=0, vmax=max(1, int(matrix.max())))
    axes.set_xticks(range(len(types)), types, rotation=45, ha="right")
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlabel("module")
    axes.set_ylabel("layer")
    axes.set_title(title)
    threshold = 0.6 * max(1, int(matrix.max()))
    for i in range(len(layers)):
        for j in range(len(types)):
            value = int(matrix[i, j])
            colour = "black" if value > threshold else "white"
            axes.text(j, i, str(value), ha="center", va="center", color=colour, fontsize=8)
    figure.colorbar(image, ax=axes, label="rank")
    return _save(figure, path)


def loss_curve(
    steps: Sequence[int], losses: Sequence[float], path: str | Path, title: str = "training loss"
) -> Path:
    """Save the loss against the optimizer step as a PNG."""
    if len(steps) != len(losses):
        raise ValueError(f"steps and losses differ in length: {len(steps)} vs {len(losses)}")
    figure = Figure(figsize=(6.0, 3.5), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(steps, losses, linewidth=1.2)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
