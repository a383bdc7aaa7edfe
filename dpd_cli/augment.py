"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, 2021), as MTT uses it.

One call applies ONE family, drawn at random, with fresh parameters per image:
color (brightness +-0.5, saturation x U(0,2), contrast x U(0.5,1.5)), crop (translate
+-12.5%), cutout (a half-size square), flip (p = 0.5), scale (U(1/1.2, 1.2) per axis),
rotate (+-15 degrees). Every op is differentiable w.r.t. the images.

Everything random is derived from one integer ``seed``: the same seed on the same device
replays the same augmentation, which the low-memory meta-gradient relies on. One generator per
device is kept and re-seeded on every call, rather than a new one created per call.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

__all__ = ["dsa", "OPS"]

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")

_BRIGHTNESS, _SATURATION, _CONTRAST = 1.0, 2.0, 0.5
_CROP, _CUTOUT, _FLIP, _SCALE, _ROTATE = 0.125, 0.5, 0.5, 1.2, 15.0


def _rand(n: int, g: torch.Generator, x: torch.Tensor) -> torch.Tensor:
    return torch.rand(n, 1, 1, 1, generator=g, device=x.device, dtype=x.dtype)


def _color(x, g):
    n = x.shape[0]
    x = x + (_rand(n, g, x) - 0.5) * _BRIGHTNESS
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (_rand(n, g, x) * _SATURATION) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_rand(n, g, x) + _CONTRAST) + m


def _crop(x, g):
    # Translate by up to 12.5% of the side; pixels shifted in are zeros.
    n, _, h, w = x.shape
    sh, sw = int(h * _CROP + 0.5), int(w * _CROP + 0.5)
    dx = torch.randint(-sh, sh + 1, (n, 1, 1), generator=g, device=x.device)
    dy = torch.randint(-sw, sw + 1, (n, 1, 1), generator=g, device=x.device)
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dx + 1).clamp(0, h + 1)  # (N, H, 1)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dy + 1).clamp(0, w + 1)  # (N, 1, W)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # (N, H+2, W+2, C)
    return padded[batch, rows, cols].permute(0, 3, 1, 2)


def _cutout(x, g):
    n, _, h, w = x.shape
    ch, cw = int(h * _CUTOUT + 0.5), int(w * _CUTOUT + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), generator=g, device=x.device) - ch // 2
    oy = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), generator=g, device=x.device) - cw // 2
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    hole = (rows >= ox) & (rows < ox + ch) & (cols >= oy) & (cols < oy + cw)  # (N, H, W)
    return x * (~hole).unsqueeze(1).to(x.dtype)


def _flip(x, g):
    return torch.where(_rand(x.shape[0], g, x) < _FLIP, x.flip(3), x)


def _affine(x, theta):
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _scale(x, g):
    n = x.shape[0]
    lo = 1.0 / _SCALE
    s = torch.rand(n, 2, generator=g, device=x.device, dtype=x.dtype) * (_SCALE - lo) + lo
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = s[:, 0], s[:, 1]
    return _affine(x, theta)


def _rotate(x, g):
    n = x.shape[0]
    a = (torch.rand(n, generator=g, device=x.device, dtype=x.dtype) - 0.5) * 2 * _ROTATE / 180 * math.pi
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.stack([torch.stack([cos, sin, torch.zeros_like(a)], 1), torch.stack([-sin, cos, torch.zeros_like(a)], 1)], 1)
    return _affine(x, theta)


_FNS = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


def dsa(x: torch.Tensor, seed: int, ops: tuple[str, ...] = OPS) -> torch.Tensor:
    """Apply one randomly chosen DSA family to a batch ``(N, C, H, W)``.

    Args:
        x: Images in training space; gradients flow through.
        seed: Determines the family and all per-image parameters (on ``x.device``).
        ops: Families to choose from.

    Returns:
        Augmented images, same shape and dtype.
    """
    op = ops[random.Random(seed).randrange(len(ops))]
    return _FNS[op](x, _generator(x.device, seed))


_GENERATORS: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """The device's DSA generator, re-seeded: the same state as a fresh ``torch.Generator`` seeded with ``seed``.

    Not thread-safe: two threads augmenting on the same device at once would share it.
    """
    g = _GENERATORS.get(device)
    if g is None:
        g = _GENERATORS[device] = torch.Generator(device=device)
    return g.manual_seed(seed)
