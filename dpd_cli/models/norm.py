"""Instance norm (``GroupNorm(C, C)``) with an analytic first and second derivative.

Distillation differentiates the student's gradient (``create_graph=True``). For that, PyTorch
differentiates ``F.group_norm`` through its "infinitely differentiable" decomposition: about
30 small ops per norm layer in every unrolled step, each saving tensors for the outer backward.
Here the norm is two autograd nodes instead:

* ``_InstanceNorm`` (forward): ATen's fused ``native_group_norm`` kernel, so the output is bitwise
  what ``F.group_norm`` gives. Its backward is ``_InstanceNormBackward``.
* ``_InstanceNormBackward`` (the first derivative as a function of ``(dy, x, w)``): ATen's fused
  ``native_group_norm_backward`` kernel -- the one plain ``.backward()`` through ``F.group_norm``
  runs, so expert and evaluation training get the same gradients as before. Its own backward
  (the second derivative) is the closed form below.

Math, per instance (n, c) with M = H*W values, <.> the mean over them, r = 1/sqrt(var + eps),
xh = (x - mean) r, g = w dy::

    y  = w xh + b
    dx = r (g - <g> - xh <g xh>)          dw = sum_{n,hw} dy xh          db = sum_{n,hw} dy

Given cotangents (a, p, q) of (dx, dw, db), the vector-Jacobian product of that map is::

    d dy = w r (a - <a> - xh <a xh>) + p xh + q
    d w  = sum_n M r (<a dy> - <a><dy> - <a xh><dy xh>)
    d x  = r (G - <G> - xh (<xh G> + <a dx>)),   G = p dy - r w (a <dy xh> + dy <a xh>)

(from d xh = r (dx - <dx> - xh <xh dx>) and d r = -r^2 <xh dx>, which hold with eps > 0). Every
term is a per-instance scalar times one of dy, a, xh, so the second derivative is a handful of
large elementwise ops and five reductions. It is not differentiable again (third order raises).
docs/algorithm.md "Networks" describes where it is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["InstanceNorm", "instance_norm"]


def _sizes(x: torch.Tensor) -> tuple[int, int, int]:
    n, c = x.shape[0], x.shape[1]
    return n, c, x.numel() // (n * c)


class _InstanceNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n, c, hw = _sizes(x)
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, c, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw, db = _InstanceNormBackward.apply(dy, x, weight, mean, rstd, (need_x, need_w, need_b))
        return dx, dw, db, None


class _InstanceNormBackward(torch.autograd.Function):
    """``(dy, x, weight) -> (dx, dw, db)`` of instance norm; ``mean``/``rstd`` are x's statistics."""

    @staticmethod
    def forward(ctx, dy, x, weight, mean, rstd, mask):
        n, c, hw = _sizes(x)
        dy = dy.contiguous()
        mask = [mask[0], mask[1] and weight is not None, mask[2] and weight is not None]
        dx, dw, db = torch.ops.aten.native_group_norm_backward(dy, x, mean, rstd, weight, n, c, hw, c, mask)
        ctx.save_for_backward(dy, x, weight, mean, rstd)
        ctx.set_materialize_grads(False)  # absent cotangents arrive as None: no zero tensors
        return dx, dw, db

    @staticmethod
    @once_differentiable
    def backward(ctx, a, p, q):
        dy, x, weight, mean, rstd = ctx.saved_tensors
        need_dy, need_x, need_w = ctx.needs_input_grad[:3]
        n, c, hw = _sizes(x)
        shape = x.shape
        # Work in (N, C, M). Per-instance scalars are (N, C, 1), per-channel ones (1, C, 1): all the
        # arithmetic on them is cheap; the full-size work is five reductions and two outputs written
        # as scalar * tensor sums. xh is never stored: xh = r x - r mean, folded into the scalars,
        # which is how ATen's group-norm kernels compute it too.
        dy3, x3 = dy.reshape(n, c, hw), x.reshape(n, c, hw)
        r, mu = rstd.view(n, c, 1), mean.view(n, c, 1)
        rw = r if weight is None else r * weight.view(1, c, 1)
        p = None if p is None else p.view(1, c, 1)
        q = None if q is None else q.view(1, c, 1)

        def mean_of(u, v=None):  # <u> or <u v> over M, (N, C, 1); einsum runs as one batched matmul
            s = u.sum(2, keepdim=True) if v is None else torch.einsum("ncm,ncm->nc", u, v).unsqueeze(2)
            return s / hw

        m_dy = mean_of(dy3)
        m_dy_xh = r * (mean_of(dy3, x3) - mu * m_dy)
        if a is not None:
            a3 = a.reshape(n, c, hw)
            m_a = mean_of(a3)
            m_a_xh = r * (mean_of(a3, x3) - mu * m_a)
            # <a dx> / (r w): the part of <a, dx> that is not along 1 or xh
            a_dx = mean_of(a3, dy3) - m_a * m_dy - m_a_xh * m_dy_xh

        d_dy = d_x = d_w = None
        if need_dy and (a is not None or p is not None or q is not None):
            # d dy = (w r) a + c_xh xh + c_0,  c_xh = p - w r <a xh>,  c_0 = q - w r <a>
            c_xh = torch.zeros_like(r) if p is None else p.expand_as(r)
            c_0 = torch.zeros_like(r) if q is None else q.expand_as(r)
            if a is not None:
                c_xh = c_xh - rw * m_a_xh
                c_0 = c_0 - rw * m_a
            out = torch.addcmul(c_0 - c_xh * r * mu, x3, c_xh * r)
            if a is not None:
                out.addcmul_(a3, rw)
            d_dy = out.view(shape)
        if need_w and a is not None and weight is not None:
            d_w = (hw * r * a_dx).sum(0).view(c)
        if need_x and (a is not None or p is not None):
            # d x = r (G - <G> - xh (<xh G> + <a dx>)),  G = c_dy dy + c_a a
            c_dy = torch.zeros_like(r) if p is None else p.expand_as(r)
            m_G = 0.0 if p is None else p * m_dy
            m_xh_G = 0.0 if p is None else p * m_dy_xh
            if a is not None:
                c_dy = c_dy - rw * m_a_xh
                c_a = -rw * m_dy_xh
                m_G = m_G - rw * (m_a * m_dy_xh + m_dy * m_a_xh)
                m_xh_G = m_xh_G - 2 * rw * m_a_xh * m_dy_xh + rw * a_dx
            c_xh = -m_xh_G  # times xh = r x - r mean
            out = torch.addcmul(r * (-m_G - c_xh * r * mu), dy3, r * c_dy)
            if a is not None:
                out.addcmul_(a3, r * c_a)
            d_x = out.addcmul_(x3, r * r * c_xh).view(shape)
        return d_dy, d_x, d_w, None, None, None


def instance_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """``F.group_norm(x, C, weight, bias, eps)`` for ``x`` of shape ``(N, C, *)``, twice differentiable in two nodes.

    Args:
        x: ``(N, C, *)``; each (n, c) slice is normalised on its own.
        weight, bias: ``(C,)`` or both ``None`` (no affine).
        eps: Added to the variance.

    Returns:
        Like ``x``.
    """
    if x.numel() <= 1 or (weight is None) != (bias is None):  # F.group_norm raises on one value
        return F.group_norm(x, x.shape[1], weight, bias, eps)
    return _InstanceNorm.apply(x, weight, bias, eps)


class InstanceNorm(nn.GroupNorm):
    """``nn.GroupNorm(C, C)`` computed by :func:`instance_norm`.

    A subclass, so parameter names (``weight``, ``bias``), state dicts, the flat layout and
    stored files are those of ``nn.GroupNorm``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None):
        super().__init__(num_channels, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return instance_norm(x, self.weight, self.bias, self.eps)
