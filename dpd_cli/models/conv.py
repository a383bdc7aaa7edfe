"""A 2-D convolution (stride 1) whose second derivative is written out with efficient kernels.

The distillation student's gradient is differentiated again (``create_graph=True``). PyTorch's
double backward of a convolution computes the weight-gradient term as a *forward* convolution with
the batch and channel axes swapped, whose "kernel" is the whole feature map (16 x 16 for
ConvNet-128's second layer on 28x28 inputs): a slow shape for convolution kernels (on 2 CPU cores
that one call took a seventh of a distillation iteration). Here the same three terms are each one
call of the kernels that first derivatives use (``aten.convolution`` and ``aten.convolution_backward``).

With y = conv(x, w) + b and incoming gradient gy, the backward is::

    gx = conv_x^T(gy; w)      gw = conv_w^T(gy; x)      gb = sum_{n,h,w} gy

(gx and gw from ``aten.convolution_backward``, what ``F.conv2d``'s own backward calls, so they are
bit for bit PyTorch's; gb is ``gy.sum((0, 2, 3))``, equal up to summation order). Everything there
is linear in gy and bilinear in (gy, x) or (gy, w); given cotangents (a, p, q) of (gx, gw, gb)::

    d gy = conv(a; w) + conv(x; p) + q           (q broadcast over n, h, w)
    d x  = conv_x^T(gy; p)                       (the input gradient of conv(x; p))
    d w  = conv_w^T(gy; a)                       (the weight gradient of conv(a; w))

because <a, gx> = <conv(a; w), gy> and <p, gw> = <conv(x; p), gy>. Only what the caller needs is
computed; the second derivative is not differentiable again (``once_differentiable``). A grouped
convolution (``groups`` G: G convolutions side by side, as K students run as one wide network) is
block-diagonal, so every identity holds block by block and the same calls take ``groups``. A plain
backward (no ``create_graph``) computes (gx, gw, gb) without building the node for the second one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dpd_cli.models import use_fused

__all__ = ["conv2d"]


def _backward(gy, x, w, padding: int, mask, groups: int = 1):
    """``(gx, gw, gb)`` of ``conv2d(x, w, b, padding, groups)`` at incoming gradient ``gy``; None where not ``mask``."""
    gx, gw, _ = torch.ops.aten.convolution_backward(
        gy, x, w, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], groups, [mask[0], mask[1], False]
    )
    return gx, gw, (gy.sum((0, 2, 3)) if mask[2] else None)


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, padding, groups):
        ctx.save_for_backward(x, w)
        ctx.padding, ctx.groups = padding, groups
        return F.conv2d(x, w, b, padding=padding, groups=groups)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        mask = tuple(ctx.needs_input_grad[:3])
        if not torch.is_grad_enabled():  # a plain backward (no create_graph): no node for a second derivative
            return (*_backward(gy, x, w, ctx.padding, mask, ctx.groups), None, None)
        gx, gw, gb = _Conv2dBackward.apply(gy, x, w, ctx.padding, mask, ctx.groups)
        return gx, gw, gb, None, None


class _Conv2dBackward(torch.autograd.Function):
    """``(gy, x, w) -> (gx, gw, gb)`` of the convolution; its own backward is the closed form above."""

    @staticmethod
    def forward(ctx, gy, x, w, padding, mask, groups):
        gx, gw, gb = _backward(gy, x, w, padding, mask, groups)
        ctx.save_for_backward(gy, x, w)
        ctx.padding, ctx.groups = padding, groups
        ctx.set_materialize_grads(False)  # absent cotangents arrive as None: no zero tensors, no work
        return gx, gw, gb

    @staticmethod
    @once_differentiable
    def backward(ctx, a, p, q):
        gy, x, w = ctx.saved_tensors
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        pad, groups = ctx.padding, ctx.groups
        d_gy = d_x = d_w = None
        if need_gy:
            if a is not None:
                d_gy = F.conv2d(a, w, padding=pad, groups=groups)
            if p is not None:
                term = F.conv2d(x, p, padding=pad, groups=groups)
                d_gy = term if d_gy is None else d_gy.add_(term)
            if q is not None:
                qb = q.view(1, -1, 1, 1)
                d_gy = qb.expand_as(gy).clone() if d_gy is None else d_gy.add_(qb)
        if need_x and p is not None:
            d_x = _backward(gy, x, p, pad, (True, False, False), groups)[0]
        if need_w and a is not None:
            d_w = _backward(gy, a, w, pad, (False, True, False), groups)[1]
        return d_gy, d_x, d_w, None, None, None


def conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, padding: int = 0, groups: int = 1
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding, groups=groups)`` (stride 1), twice differentiable with the
    second derivative in ATen convolution calls; ``F.conv2d`` itself with ``dpd_cli.models.use_fused()`` off (the
    reference) or for an input that is not a batch of images."""
    if not use_fused() or x.dim() != 4:
        return F.conv2d(x, weight, bias, padding=padding, groups=groups)
    return _Conv2d.apply(x, weight, bias, padding, groups)
