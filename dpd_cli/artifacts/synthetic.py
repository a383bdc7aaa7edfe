"""``synthetic.safetensors`` and ``checkpoints/ckpt-NNNNNN.safetensors``.

A synthetic set is standalone: images (training space), labels, the learned alpha, the full preprocessing
and, from format version 2, maybe learned soft labels (``label_logits``). A checkpoint adds the resume
state (momentum, prune counters and state); from version 2 it refers to its run's ``preprocess.safetensors``
for the ZCA matrices (75 MB for CIFAR, otherwise copied into every kept checkpoint). ``load`` is the one
strict reader: a damaged or foreign file is refused, never half-used.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dpd_cli.artifacts import layout
from dpd_cli.artifacts import preprocess as preprocess_file
from dpd_cli.artifacts.experts import model_tag
from dpd_cli.data import Preprocess
from dpd_cli.errors import StorageError
from dpd_cli.io import storage
from dpd_cli.models.spec import spec_from_meta

SYNTHETIC_FORMAT = "dpd.synthetic"
CHECKPOINT_FORMAT = "dpd.checkpoint"
_HINT = "It is damaged or was not written by this dpd."
_SYNTHETIC_TENSORS = {
    "images": (torch.float32, 4),
    "labels": (torch.int64, 1),
    "lr": (torch.float32, 0),
    "norm_mean": (torch.float32, 1),
    "norm_std": (torch.float32, 1),
}
#: The tensors each format must hold, as ``(dtype, ndim)`` (more are checked once loaded).
REQUIRED = {
    SYNTHETIC_FORMAT: _SYNTHETIC_TENSORS,
    CHECKPOINT_FORMAT: {
        **_SYNTHETIC_TENSORS,
        "momentum_images": (torch.float32, 4),
        "momentum_lr": (torch.float32, 0),
        "prune_counts": (torch.int32, 1),
    },
}


def save_synthetic(
    path: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: torch.Tensor,
    pre: Preprocess,
    meta: Mapping[str, Any],
    label_logits: torch.Tensor | None = None,
) -> None:
    """Write a standalone synthetic set (atomically); ``label_logits`` are learned soft labels, if any."""
    soft = {} if label_logits is None else {"label_logits": label_logits}
    storage.save_tensors(
        path, {"images": images, "labels": labels, "lr": lr, **soft, **pre.tensors()}, SYNTHETIC_FORMAT, meta
    )


def save_checkpoint(path: Path, tensors: Mapping[str, torch.Tensor], pre: Preprocess, meta: Mapping[str, Any]) -> None:
    """Write a checkpoint (atomically): ``tensors`` = images, labels, lr and the resume state.

    Only the normalisation goes in; the ZCA transform stays in the run's preprocess.safetensors,
    identified by ``preprocess_fingerprint`` in the metadata.
    """
    norm = {k: v for k, v in pre.tensors().items() if k.startswith("norm_")}
    meta = {**meta, "preprocess_fingerprint": pre.fingerprint(), "zca": pre.has_zca}
    storage.save_tensors(path, {**tensors, **norm}, CHECKPOINT_FORMAT, meta)


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load and validate a synthetic set or a checkpoint, with the complete preprocessing (``norm_*`` and, with
    ZCA, ``zca_*``: a version 2 checkpoint's comes from its run's preprocess.safetensors)."""
    path = Path(path)
    fmt = _format(path)
    t, meta = storage.load_tensors(path, fmt, REQUIRED[fmt])
    for k in ("model", "classes", "dataset"):
        if k not in meta:
            raise StorageError(f"{path} lacks the metadata entry {k!r}; it was not written by this dpd.")
    spec = spec_from_meta(path, meta["model"])
    classes = meta["classes"]
    if not isinstance(classes, list) or len(classes) != spec.n_classes or not all(isinstance(c, str) for c in classes):
        raise StorageError(
            f"{path}: the metadata entry 'classes' is not a list of {spec.n_classes} class names. {_HINT}"
        )
    if not isinstance(meta["dataset"], str) or not meta["dataset"]:
        raise StorageError(f"{path}: the metadata entry 'dataset' is not a dataset name. {_HINT}")
    for k, kind in (("settings", dict), ("iteration", int), ("iterations", int), ("ipc", int)):
        if k in meta and (not isinstance(meta[k], kind) or isinstance(meta[k], bool)):
            raise StorageError(f"{path}: the metadata entry {k!r} is malformed ({str(meta[k])[:100]}). {_HINT}")
    if fmt == CHECKPOINT_FORMAT and not (isinstance(meta.get("iteration"), int) and meta["iteration"] >= 0):
        raise StorageError(f"{path}: a checkpoint needs a non-negative 'iteration' metadata entry. {_HINT}")
    images, labels = t["images"], t["labels"]
    if tuple(images.shape[1:]) != (spec.channels, *spec.image_size) or len(images) == 0:
        raise StorageError(
            f"{path}: images have shape {tuple(images.shape)}, but the model takes ({spec.channels}, "
            f"{spec.image_size[0]}, {spec.image_size[1]}) images. {_HINT}"
        )
    if len(images) != len(labels):
        raise StorageError(f"{path}: {len(images)} images but {len(labels)} labels.")
    if labels.min() < 0 or labels.max() >= spec.n_classes:
        raise StorageError(
            f"{path}: labels must lie in 0..{spec.n_classes - 1}, found {int(labels.min())}..{int(labels.max())}. "
            f"{_HINT}"
        )
    if not torch.isfinite(images).all() or not torch.isfinite(t["lr"]) or t["lr"] <= 0:
        raise StorageError(f"{path} holds non-finite images or a non-positive learning rate.")
    shapes = {"label_logits": (len(labels), spec.n_classes), "momentum_labels": (len(labels), spec.n_classes)}
    if fmt == CHECKPOINT_FORMAT:
        shapes.update(momentum_images=tuple(images.shape), momentum_lr=())
        if (t["prune_counts"] < 0).any():
            raise StorageError(f"{path}: negative prune counts. {_HINT}")
        shapes["prune_state"] = tuple(t["prune_counts"].shape)
    for k, shape in shapes.items():
        if k in t:
            preprocess_file.check_float(path, t, k, shape, _HINT)
    if fmt == CHECKPOINT_FORMAT and meta.get("zca") is True and "zca_matrix" not in t:
        t.update(_run_zca(path, meta, spec))
    preprocess_file.check_tensors(path, t, spec.channels, spec.image_size, _HINT)
    return t, meta


def _format(path: Path) -> str:
    """``dpd.synthetic`` or ``dpd.checkpoint``, from the header; anything else is refused."""
    _, raw = storage.read_header(path)
    fmt = raw.get("format")
    if fmt not in REQUIRED:
        raise StorageError(f"{path} is not a synthetic set or checkpoint written by dpd distill (format {fmt!r}).")
    return fmt


def check_header(path: Path) -> dict:
    """The metadata of a synthetic set or checkpoint, after the checks its header allows: format, version
    and the required tensors' dtypes and ranks (``load`` checks everything)."""
    path = Path(path)
    header, meta = storage.read_meta(path, _format(path))
    storage.check_header_tensors(path, header, REQUIRED[meta["format"]])
    return meta


def _run_zca(path: Path, meta: dict, spec) -> dict[str, torch.Tensor]:
    """The ZCA tensors a version 2 checkpoint refers to, from its run's preprocess.safetensors."""
    source = path.parent.parent / layout.PREPROCESS if path.parent.name == layout.CHECKPOINTS else None
    if source is None or not source.exists():
        raise StorageError(
            f"{path} is a checkpoint of a ZCA run: its ZCA matrices live in the run directory's {layout.PREPROCESS}, "
            f"which is {'missing' if source is not None else 'not next to it'}. Keep checkpoints inside their run "
            f"directory (RUN/{layout.CHECKPOINTS}/), or use the run's synthetic.safetensors, which is standalone."
        )
    pre = preprocess_file.load(source, spec.channels, spec.image_size, "Rerun `dpd distill --resume` to rewrite it.")
    if pre.fingerprint() != meta.get("preprocess_fingerprint"):
        raise StorageError(
            f"{source} is not the preprocessing {path.name} was written with (fingerprint "
            f"{pre.fingerprint()}, the checkpoint records {meta.get('preprocess_fingerprint')})."
        )
    return {k: v for k, v in pre.tensors().items() if k.startswith("zca_")}


def soft_targets(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """What a network trains on: softmax of the learned label logits ``(n, C)``, or the class indices ``(n,)``."""
    if "label_logits" in t:
        return torch.softmax(t["label_logits"], dim=1)
    return t["labels"]


def label_mass(t: dict[str, torch.Tensor], classes: list[str], k: int = 3) -> list[dict] | None:
    """Per class (of the images' hard labels): the mean probability each soft label puts on its own class, and
    the k classes with the most mass on average. ``None`` for hard labels."""
    if "label_logits" not in t:
        return None
    probs, labels = torch.softmax(t["label_logits"].double(), dim=1), t["labels"]
    out = []
    for c, name in enumerate(classes):
        if (labels == c).any():
            mean = probs[labels == c].mean(0)
            top = torch.topk(mean, min(k, len(classes)))
            top = [{"class": classes[int(i)], "mass": float(v)} for v, i in zip(top.values, top.indices)]
            out.append({"class": name, "own": float(mean[c]), "top": top})
    return out


def describe(t: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    """What a loaded set (``load``'s result) holds, JSON-ready: no tensors, and no NaN (``alpha`` is finite once loaded)."""
    classes = meta.get("classes") or []
    return {
        "dataset": meta.get("dataset"),
        "n_images": len(t["labels"]),
        "image_shape": list(t["images"].shape[1:]),
        "classes": classes,
        "n_classes": len(classes),
        "ipc": meta.get("ipc"),
        "iteration": meta.get("iteration"),
        "iterations": meta.get("iterations"),
        "alpha": float(t["lr"]),
        "zca": "zca_matrix" in t,
        "model_tag": model_tag(meta.get("model")),
        "soft_labels": label_mass(t, classes) if classes else None,  # None: hard labels
        "soft_label_source": meta.get("soft_labels"),
    }
