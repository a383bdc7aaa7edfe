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


def _rand(n: int, g: torch.Generator, x: torch.Tensor, rows: slice) -> torch.Tensor:
    """U(0, 1) per image of the whole batch of ``n``, this part's ``rows``: ``(len(x), 1, 1, 1)``."""
    return torch.rand(n, 1, 1, 1, generator=g, device=x.device, dtype=x.dtype)[rows]


def _color(x, g, n, rows):
    x = x + (_rand(n, g, x, rows) - 0.5) * _BRIGHTNESS
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (_rand(n, g, x, rows) * _SATURATION) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_rand(n, g, x, rows) + _CONTRAST) + m


def _crop(x, g, n, rows):
    # Translate by up to 12.5% of the side; pixels shifted in are zeros.
    b, _, h, w = x.shape
    sh, sw = int(h * _CROP + 0.5), int(w * _CROP + 0.5)
    dx = torch.randint(-sh, sh + 1, (n, 1, 1), generator=g, device=x.device)[rows]
    dy = torch.randint(-sw, sw + 1, (n, 1, 1), generator=g, device=x.device)[rows]
    rr = (torch.arange(h, device=x.device).view(1, h, 1) + dx + 1).clamp(0, h + 1)  # (B, H, 1)
    cc = (torch.arange(w, device=x.device).view(1, 1, w) + dy + 1).clamp(0, w + 1)  # (B, 1, W)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # (B, H+2, W+2, C)
    return padded[batch, rr, cc].permute(0, 3, 1, 2)


def _cutout(x, g, n, rows):
    _, _, h, w = x.shape
    ch, cw = int(h * _CUTOUT + 0.5), int(w * _CUTOUT + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), generator=g, device=x.device)[rows] - ch // 2
    oy = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), generator=g, device=x.device)[rows] - cw // 2
    rr = torch.arange(h, device=x.device).view(1, h, 1)
    cc = torch.arange(w, device=x.device).view(1, 1, w)
    hole = (rr >= ox) & (rr < ox + ch) & (cc >= oy) & (cc < oy + cw)  # (B, H, W)
    return x * (~hole).unsqueeze(1).to(x.dtype)


def _flip(x, g, n, rows):
    return torch.where(_rand(n, g, x, rows) < _FLIP, x.flip(3), x)


def _affine(x, theta):
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _scale(x, g, n, rows):
    lo = 1.0 / _SCALE
    s = (torch.rand(n, 2, generator=g, device=x.device, dtype=x.dtype) * (_SCALE - lo) + lo)[rows]
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = s[:, 0], s[:, 1]
    return _affine(x, theta)


def _rotate(x, g, n, rows):
    a = ((torch.rand(n, generator=g, device=x.device, dtype=x.dtype) - 0.5) * 2 * _ROTATE / 180 * math.pi)[rows]
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.stack([torch.stack([cos, sin, torch.zeros_like(a)], 1), torch.stack([-sin, cos, torch.zeros_like(a)], 1)], 1)
    return _affine(x, theta)


_FNS = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


def dsa(x: torch.Tensor, seed: int, ops: tuple[str, ...] = OPS, part: tuple[int, int] | None = None) -> torch.Tensor:
    """Apply one randomly chosen DSA family to a batch ``(N, C, H, W)``.

    Args:
        x: Images in training space; gradients flow through.
        seed: Determines the family and all per-image parameters (on ``x.device``).
        ops: Families to choose from.
        part: ``(lo, n)``: ``x`` holds rows ``lo .. lo + len(x) - 1`` of a batch of ``n`` (one rank's
            share under data parallel). The parameters are drawn for all ``n`` images and this
            part's rows taken, so the whole batch is augmented the same however it is split.

    Returns:
        Augmented images, same shape and dtype.
    """
    op = ops[random.Random(seed).randrange(len(ops))]
    lo, n = part if part is not None else (0, x.shape[0])
    return _FNS[op](x, _generator(x.device, seed), n, slice(lo, lo + x.shape[0]))


_GENERATORS: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """The device's DSA generator, re-seeded: the same state as a fresh ``torch.Generator`` seeded with ``seed``.

    Not thread-safe: two threads augmenting on the same device at once would share it.
    """
    g = _GENERATORS.get(device)
    if g is None:
        g = _GENERATORS[device] = torch.Generator(device=device)
    return g.manual_seed(seed)
