"""``preprocess.safetensors``: the normalisation / ZCA tensors of an experts folder or a run directory."""

from __future__ import annotations

from pathlib import Path

import torch

from dpd_cli.data import Preprocess
from dpd_cli.errors import StorageError
from dpd_cli.io import storage

FORMAT = "dpd.preprocess"
#: The tensors every preprocessing file holds, as ``(dtype, ndim)``; ZCA adds ``zca_mean``, ``zca_matrix``, ``zca_inverse``.
REQUIRED = {"norm_mean": (torch.float32, 1), "norm_std": (torch.float32, 1)}


def save(path: Path, pre: Preprocess) -> None:
    storage.save_tensors(path, pre.tensors(), FORMAT, {"fingerprint": pre.fingerprint()})


def check_float(path: Path, t: dict[str, torch.Tensor], k: str, shape: tuple[int, ...], hint: str) -> None:
    """``t[k]`` is a finite float32 tensor of ``shape``."""
    v = t.get(k)
    if v is None or tuple(v.shape) != shape or v.dtype != torch.float32 or not torch.isfinite(v).all():
        got = "missing" if v is None else f"{v.dtype} {tuple(v.shape)}"
        raise StorageError(f"{path}: tensor {k!r} is {got}, expected finite float32 {shape}. {hint}")


def check_tensors(path: Path, t: dict[str, torch.Tensor], channels: int, size: tuple[int, int], hint: str) -> None:
    """The preprocessing tensors of a file, checked for a model of ``channels`` x ``size`` images (the
    message of a refusal ends with ``hint``)."""
    d = channels * size[0] * size[1]
    shapes = {"norm_mean": (channels,), "norm_std": (channels,)}
    zca = [k for k in ("zca_mean", "zca_matrix", "zca_inverse") if k in t]
    if zca:
        if len(zca) != 3:
            raise StorageError(f"{path} holds only part of the ZCA transform ({', '.join(zca)}). {hint}")
        shapes.update(zca_mean=(d,), zca_matrix=(d, d), zca_inverse=(d, d))
    for k, shape in shapes.items():
        check_float(path, t, k, shape, hint)
    if not (t["norm_std"] > 0).all():
        raise StorageError(f"{path}: the normalisation std must be positive. {hint}")


def check_header(path: Path) -> dict:
    """``{"zca", "fingerprint"}`` of a preprocessing file, from its header alone (format, version, tensor table)."""
    header, meta = storage.read_meta(path, FORMAT)
    storage.check_header_tensors(path, header, REQUIRED)
    return {"zca": "zca_matrix" in header, "fingerprint": meta.get("fingerprint")}


def load(
    path: Path, channels: int, size: tuple[int, int], hint: str = "Delete the file and recreate it with dpd."
) -> Preprocess:
    """The transform stored in ``path``, checked against the image shape it must apply to (refusals end with ``hint``)."""
    path = Path(path)
    if not path.exists():
        raise StorageError(f"{path} is missing. {hint}")
    t, meta = storage.load_tensors(path, FORMAT, REQUIRED)
    check_tensors(path, t, channels, size, hint)
    pre = Preprocess.from_tensors(t)
    recorded = meta.get("fingerprint")
    if recorded is not None and recorded != pre.fingerprint():
        raise StorageError(f"{path}: its tensors do not match the fingerprint it records ({recorded}). {hint}")
    return pre
