"""Shared test helpers."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["StopWhen", "assert_close", "fused", "make_image_folder", "mtt_buffer", "mtt_convnet", "tiny_spec"]


class StopWhen:
    """An event sink that requests a stop (as Ctrl-C would) when ``predicate(event)`` is true."""

    def __init__(self, predicate):
        self.predicate = predicate

    def emit(self, event) -> None:
        if self.predicate(event):
            from dpd_cli import interrupt

            interrupt.request()

    def close(self) -> None:
        pass


@contextmanager
def fused(enabled: bool):
    """Run the block with ``dpd_cli.models.use_fused()`` set to ``enabled`` (restored afterwards)."""
    from dpd_cli.models import set_fused

    previous = set_fused(enabled)
    try:
        yield
    finally:
        set_fused(previous)


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
    """A tiny ConvNet spec: a couple of layers on tiny images."""
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


def mtt_convnet(
    channel: int,
    n_classes: int,
    width: int,
    depth: int,
    im_size=(32, 32),
    norm: str = "instancenorm",
    pooling: str = "avgpooling",
):
    """MTT's ConvNet as MTT's networks.py builds it, written out for tests: ``features`` (conv, norm, ReLU, pool per
    layer) then ``classifier``, so ``parameters()`` come in MTT's order. 28 px is treated as 32 px and grayscale
    images get padding 3 in the first conv, as there."""
    from torch import nn

    layers: list = []
    c = channel
    h, w = (32, 32) if im_size[0] == 28 else tuple(im_size)
    for d in range(depth):
        layers.append(nn.Conv2d(c, width, kernel_size=3, padding=3 if channel == 1 and d == 0 else 1))
        if norm == "instancenorm":
            layers.append(nn.GroupNorm(width, width, affine=True))
        elif norm == "batchnorm":
            layers.append(nn.BatchNorm2d(width, affine=True))
        layers.append(nn.ReLU(inplace=True))
        layers.append(nn.AvgPool2d(2, 2) if pooling == "avgpooling" else nn.MaxPool2d(2, 2))
        c, h, w = width, h // 2, w // 2

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(width * h * w, n_classes)

        def forward(self, x):
            out = self.features(x)
            return self.classifier(out.view(out.size(0), -1))

    return ConvNet()


def mtt_buffer(nets, n_snapshots: int = 3, step: float = 0.05, seed: int = 0) -> list:
    """A replay buffer as MTT's buffer.py saves it: per expert, per snapshot, ``[p.detach().cpu() for p in parameters()]``.

    Each net's parameters move by seeded noise between snapshots (a stand-in for an epoch of training);
    the snapshots are copies, as a GPU-trained buffer's are.
    """
    g = torch.Generator().manual_seed(seed)
    buffer = []
    for net in nets:
        snapshots = [[p.detach().cpu().clone() for p in net.parameters()]]
        for _ in range(n_snapshots - 1):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(step * torch.randn(p.shape, generator=g))
            snapshots.append([p.detach().cpu().clone() for p in net.parameters()])
        buffer.append(snapshots)
    return buffer
