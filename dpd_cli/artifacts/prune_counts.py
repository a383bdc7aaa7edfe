"""``prune_frequency.safetensors``: how often each parameter was pruned over a run, with the layer layout."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dpd_cli.errors import StorageError
from dpd_cli.io import storage

__all__ = ["FORMAT", "save", "load", "layer_stats"]

FORMAT = "dpd.prune_counts"


def save(path: Path, counts: torch.Tensor, layout: list, iterations_pruned: int, iteration: int, rule: dict) -> None:
    """``counts``: (P,) int32; ``rule``: the prune settings that produced them (criterion, direction, mask, mode, ...)."""
    storage.save_tensors(
        path,
        {"counts": counts},
        FORMAT,
        {"layout": layout, "iterations_pruned": iterations_pruned, "iteration": iteration, "rule": rule},
    )


def load(path: Path) -> tuple[torch.Tensor, dict]:
    """``(counts, metadata)``, the counter checked against the layout it records.

    Raises:
        StorageError: Damaged or foreign file.
    """
    t, meta = storage.load_tensors(path, FORMAT, {"counts": (torch.int32, 1)})
    layout = meta.get("layout")
    try:
        total = sum(math.prod(map(int, shape)) for _, shape in layout)
    except (TypeError, ValueError) as e:
        raise StorageError(f"{path}: the metadata entry 'layout' is malformed ({e}).") from None
    if total != t["counts"].numel():
        raise StorageError(
            f"{path}: the layer layout covers {total} parameters but the counter has {t['counts'].numel()}."
        )
    if (t["counts"] < 0).any():
        raise StorageError(f"{path}: negative prune counts.")
    return t["counts"], meta


def layer_stats(counts: torch.Tensor, layout: list, iterations_pruned: int) -> dict:
    """Per-layer prune statistics from the per-parameter counter.

    ``mean_pct`` = how much of the layer was pruned in an average pruned iteration:
    ``100 · Σ counts[layer] / (layer size · iterations_pruned)``. ``ever_pct``: the share of the
    layer's parameters pruned at least once. Layers come most-pruned first.

    Raises:
        StorageError: The layout does not add up to the counter's length.
    """
    sizes = [math.prod(map(int, shape)) for _, shape in layout]
    if sum(sizes) != counts.numel():
        raise StorageError(f"the layer layout covers {sum(sizes)} parameters but the counter has {counts.numel()}.")
    counts = counts.to(torch.int64)
    layers = []
    for (name, shape), seg in zip(layout, torch.split(counts, sizes), strict=True):  # seg: (layer size,)
        total = int(seg.sum())
        size = seg.numel()
        layers.append(
            {
                "name": name,
                "shape": list(shape),
                "size": size,
                "pruned": total,  # parameter-iterations pruned
                "mean_pct": 100.0 * total / (size * iterations_pruned) if iterations_pruned and size else 0.0,
                "ever_pct": 100.0 * int((seg > 0).sum()) / size if size else 0.0,
                "max_count": int(seg.max()) if size else 0,
            }
        )
    layers.sort(key=lambda r: (-r["mean_pct"], r["name"]))
    n = counts.numel()
    return {
        "iterations_pruned": iterations_pruned,
        "n_params": n,
        "overall_pct": 100.0 * int(counts.sum()) / (n * iterations_pruned) if iterations_pruned and n else 0.0,
        "ever_pct": 100.0 * int((counts > 0).sum()) / n if n else 0.0,
        "layers": layers,
    }
