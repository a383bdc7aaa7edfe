"""Shared test helpers."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["assert_close", "make_image_folder", "tiny_spec"]


def assert_close(actual, expected, *, rtol: float | None = None, atol: float | None = None, **kwargs) -> None:
    """``torch.testing.assert_close`` that accepts plain numbers/lists and either tolerance alone."""
    if rtol is not None and atol is None:
        atol = 0.0
    if atol is not None and rtol is None:
        rtol = 0.0
    actual = actual if isinstance(actual, torch.Tensor) else torch.as_tensor(actual)
    expected = expected if isinstance(expected, torch.Tensor) else torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, **kwargs)


def tiny_spec(channels: int = 1, side: int = 8, n_classes: int = 3, width: int = 4, depth: int = 2):
    """The ConvNet spec of STYLE.md section 7: a couple of layers on tiny images."""
    from dpd_cli.models import ModelSpec

    return ModelSpec("convnet", channels, (side, side), n_classes, width=width, depth=depth)


def make_image_folder(root: Path, classes=("cat", "dog"), per_split=(3, 2), side=8) -> Path:
    """A tiny ``imagefolder`` dataset of seeded random RGB PNGs (train/<class>, test/<class>) plus one non-image file."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in zip(("train", "test"), per_split):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                arr = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(arr, "RGB").save(root / split / c / f"{i}.png")
    (root / "train" / classes[0] / "notes.txt").write_text("not an image")
    return root
