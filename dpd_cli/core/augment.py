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

__all__ = ["dsa", "dsa_draw_all", "dsa_mixed", "OPS"]

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")

_BRIGHTNESS, _SATURATION, _CONTRAST = 1.0, 2.0, 0.5
_CROP, _CUTOUT, _FLIP, _SCALE, _ROTATE = 0.125, 0.5, 0.5, 1.2, 15.0


# Each family is a draw (every random number it needs, for the whole batch of n images, in a fixed
# order from the generator) and an apply (pure tensor maths on the images and those numbers). ``dsa``
# draws and applies in one call; ``dsa_draw_all`` / ``dsa_mixed`` split them so that a captured CUDA
# graph can apply numbers drawn outside it.


def _u(g: torch.Generator, x: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=g, device=x.device, dtype=x.dtype)


def _int(g: torch.Generator, x: torch.Tensor, lo: int, hi: int, n: int) -> torch.Tensor:
    return torch.randint(lo, hi, (n, 1, 1), generator=g, device=x.device)


def _draw_color(x, g, n):
    return _u(g, x, n, 1, 1, 1), _u(g, x, n, 1, 1, 1), _u(g, x, n, 1, 1, 1)


def _color(x, brightness, saturation, contrast):
    x = x + (brightness - 0.5) * _BRIGHTNESS
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (saturation * _SATURATION) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (contrast + _CONTRAST) + m


def _draw_crop(x, g, n):
    h, w = x.shape[2:]
    sh, sw = int(h * _CROP + 0.5), int(w * _CROP + 0.5)
    return _int(g, x, -sh, sh + 1, n), _int(g, x, -sw, sw + 1, n)


def _crop(x, dx, dy):
    # Translate by up to 12.5% of the side; pixels shifted in are zeros.
    b, _, h, w = x.shape
    rr = (torch.arange(h, device=x.device).view(1, h, 1) + dx + 1).clamp(0, h + 1)  # (B, H, 1)
    cc = (torch.arange(w, device=x.device).view(1, 1, w) + dy + 1).clamp(0, w + 1)  # (B, 1, W)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # (B, H+2, W+2, C)
    # Row-major strides like every other family's output, so the network runs in one memory layout whichever
    # family was drawn: a channels-last input switches the convolutions to other (here slower) kernels.
    # ``.contiguous()`` is not enough: with one channel the permuted view already counts as contiguous.
    return padded[batch, rr, cc].permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)


def _draw_cutout(x, g, n):
    h, w = x.shape[2:]
    ch, cw = int(h * _CUTOUT + 0.5), int(w * _CUTOUT + 0.5)
    return _int(g, x, 0, h + (1 - ch % 2), n) - ch // 2, _int(g, x, 0, w + (1 - cw % 2), n) - cw // 2


def _cutout(x, ox, oy):
    _, _, h, w = x.shape
    ch, cw = int(h * _CUTOUT + 0.5), int(w * _CUTOUT + 0.5)
    rr = torch.arange(h, device=x.device).view(1, h, 1)
    cc = torch.arange(w, device=x.device).view(1, 1, w)
    hole = (rr >= ox) & (rr < ox + ch) & (cc >= oy) & (cc < oy + cw)  # (B, H, W)
    return x * (~hole).unsqueeze(1).to(x.dtype)


def _draw_flip(x, g, n):
    return (_u(g, x, n, 1, 1, 1),)


def _flip(x, u):
    return torch.where(u < _FLIP, x.flip(3), x)


def _affine(x, theta):
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _draw_scale(x, g, n):
    lo = 1.0 / _SCALE
    return (_u(g, x, n, 2) * (_SCALE - lo) + lo,)


def _scale(x, s):
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = s[:, 0], s[:, 1]
    return _affine(x, theta)


def _draw_rotate(x, g, n):
    return ((_u(g, x, n) - 0.5) * 2 * _ROTATE / 180 * math.pi,)


def _rotate(x, a):
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.stack(
        [torch.stack([cos, sin, torch.zeros_like(a)], 1), torch.stack([-sin, cos, torch.zeros_like(a)], 1)], 1
    )
    return _affine(x, theta)


_DRAW = {
    "color": _draw_color,
    "crop": _draw_crop,
    "cutout": _draw_cutout,
    "flip": _draw_flip,
    "scale": _draw_scale,
    "rotate": _draw_rotate,
}
_APPLY = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


def _chosen(seed: int, ops: tuple[str, ...]) -> int:
    """The index of the family ``seed`` picks from ``ops`` (``dsa`` and ``dsa_draw_all`` agree through this)."""
    return random.Random(seed).randrange(len(ops))


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
    op = ops[_chosen(seed, ops)]
    lo, n = part if part is not None else (0, x.shape[0])
    # Draw for the whole batch of n, apply to this part's rows (x holds just those).
    drawn = _DRAW[op](x, _generator(x.device, seed), n)
    return _APPLY[op](x, *(t[lo : lo + x.shape[0]] for t in drawn))


def dsa_draw_all(
    x: torch.Tensor, seed: int, ops: tuple[str, ...] = OPS
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    """Every family's numbers for ``seed``, and a one-hot weight on the family ``dsa`` would choose.

    Each family draws from the generator re-seeded with ``seed``, so the chosen family's numbers are
    exactly those ``dsa(x, seed, ops)`` uses; the others are valid numbers that get weight 0.

    Returns:
        ``(weights, params)``: weights ``(len(ops),)`` in x's dtype, and per family (in ``ops``
        order) the tuple of tensors its apply takes, for the whole batch ``x``.
    """
    chosen = _chosen(seed, ops)
    # A comparison with a Python number, not `weights[chosen] = 1`: nothing is copied from the host.
    weights = (torch.arange(len(ops), device=x.device) == chosen).to(x.dtype)
    return weights, [_DRAW[op](x, _generator(x.device, seed), x.shape[0]) for op in ops]


def dsa_mixed(
    x: torch.Tensor, weights: torch.Tensor, params: list[tuple[torch.Tensor, ...]], ops: tuple[str, ...] = OPS
) -> torch.Tensor:
    """``sum_k weights[k] * family_k(x; params[k])``: with ``dsa_draw_all``'s one-hot weights, ``dsa(x, seed)``.

    Every family runs, so the sequence of operations does not depend on the seed (what a CUDA graph
    needs). With one-hot weights the result and its first and second derivatives equal ``dsa``'s
    bit for bit: 1 * y = y, the other terms are exact zeros, and adding zeros changes nothing.
    """
    out = None
    for k, op in enumerate(ops):
        term = _APPLY[op](x, *params[k]) * weights[k]
        out = term if out is None else out + term
    return out


_GENERATORS: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """The device's DSA generator, re-seeded: the same state as a fresh ``torch.Generator`` seeded with ``seed``.

    Not thread-safe: two threads augmenting on the same device at once would share it.
    """
    g = _GENERATORS.get(device)
    if g is None:
        g = _GENERATORS[device] = torch.Generator(device=device)
    return g.manual_seed(seed)
