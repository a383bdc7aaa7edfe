"""Instance norm (``GroupNorm(C, C)``) with an analytic first and second derivative.

Distillation differentiates the student's gradient (``create_graph=True``). For that, PyTorch
differentiates ``F.group_norm`` through its "infinitely differentiable" decomposition: about
30 small ops per norm layer in every unrolled step, each saving tensors for the outer backward.
Here the norm is two autograd nodes instead:

* ``_InstanceNorm`` (forward): ATen's fused ``native_group_norm`` kernel, so the output is bitwise
  what ``F.group_norm`` gives; optionally followed by the ReLU, in place.
* ``_InstanceNormBackward`` (the first derivative as a function of ``(dy, x, w)``): the ReLU's
  mask, then ATen's fused ``native_group_norm_backward`` kernel -- what a plain ``.backward()``
  through ``F.group_norm`` (and ``F.relu``) runs, so expert and evaluation training get the same
  gradients as before, bit for bit. Its own backward (the second derivative) is the closed form
  below; it is not differentiable again (third order raises instead of being silently wrong).

A plain backward (no ``create_graph``: low memory's forward sweep; expert and evaluation training)
runs the same kernels without building ``_InstanceNormBackward``'s node: nothing will differentiate
it again, and at small batches on a GPU each Python node costs launch time.

Folding the ReLU in (``relu=True``, used by ``ConvNet.forward_flat``) also removes PyTorch's double
backward of ``relu``, which back-propagates a zero tensor the size of the activation. ``avg_pool2``
does the same for the 2x2 average pool. With ``dpd_cli.models.use_fused()`` off, these functions are
``torch.nn.functional`` itself, the reference the tests compare them with.

Math, per instance (n, c) with M = H*W values, <.> the mean over them, r = 1/sqrt(var + eps),
xh = (x - mean) r, and dz the incoming gradient after the ReLU mask::

    y  = relu(w xh + b)
    dx = r w (dz - <dz> - xh <dz xh>)     dw = sum_{n,hw} dz xh     db = sum_{n,hw} dz

Given cotangents (a, p, q) of (dx, dw, db), the vector-Jacobian product of that map is::

    d dz = r w a + (p - r w <a xh>) xh + q - r w <a>          (then the ReLU mask: d dy)
    d w  = sum_n M r (<a dz> - <a><dz> - <a xh><dz xh>)
    d x  = r (G - <G> - xh (<xh G> + <a dx>)),   G = (p - r w <a xh>) dz - r w <dz xh> a

(from d xh = r (dx - <dx> - xh <xh dx>) and d r = -r^2 <xh dx>, which hold with eps > 0). Every
term is a per-instance scalar times one of dz, a, x, so the second derivative is five reductions,
two outputs written as sums of scalar x tensor terms, and ~30 ops on (N, C) scalars.
docs/algorithm.md ("Networks") says where it is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from dpd_cli.models import use_fused

__all__ = ["InstanceNorm", "instance_norm", "avg_pool2"]


def _sizes(x: torch.Tensor) -> tuple[int, int, int]:
    n, c = x.shape[0], x.shape[1]
    return n, c, x.numel() // (n * c)


class _InstanceNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, relu):
        n, c, hw = _sizes(x)
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, c, eps)
        if relu:
            y = y.relu_()
        ctx.save_for_backward(x, weight, mean, rstd, y if relu else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd, y = ctx.saved_tensors
        mask = tuple(ctx.needs_input_grad[:3])
        # y (the ReLU's output) only masks: detached, so that no gradient path runs through it.
        y = None if y is None else y.detach()
        if not torch.is_grad_enabled():  # a plain backward (no create_graph): no node for a second derivative
            return (*_norm_backward(dy, x, weight, mean, rstd, y, mask)[1:], None, None)
        return (*_InstanceNormBackward.apply(dy, x, weight, mean, rstd, y, mask), None, None)


def _norm_backward(dy, x, weight, mean, rstd, y, mask):
    """``(dz, dx, dw, db)``: the ReLU-masked incoming gradient and ATen's fused group-norm backward."""
    n, c, hw = _sizes(x)
    dz = dy.contiguous() if y is None else torch.ops.aten.threshold_backward(dy, y, 0)
    mask = [mask[0], mask[1] and weight is not None, mask[2] and weight is not None]
    return (dz, *torch.ops.aten.native_group_norm_backward(dz, x, mean, rstd, weight, n, c, hw, c, mask))


class _InstanceNormBackward(torch.autograd.Function):
    """``(dy, x, weight) -> (dx, dw, db)`` of instance norm; ``mean``/``rstd`` are x's statistics.

    With ``y`` (the ReLU's output, when the ReLU is folded in) the incoming gradient is first masked
    where ``y`` is 0, as ``ReLU``'s backward does.
    """

    @staticmethod
    def forward(ctx, dy, x, weight, mean, rstd, y, mask):
        dz, dx, dw, db = _norm_backward(dy, x, weight, mean, rstd, y, mask)
        ctx.save_for_backward(dz, x, weight, mean, rstd, y)
        ctx.set_materialize_grads(False)  # absent cotangents arrive as None: no zero tensors
        return dx, dw, db

    @staticmethod
    @once_differentiable
    def backward(ctx, a, p, q):
        dz, x, weight, mean, rstd, y = ctx.saved_tensors  # dz: the incoming gradient after the ReLU mask
        need_dy, need_x, need_w = ctx.needs_input_grad[:3]
        if a is None and p is None and q is None:
            return (None,) * 7
        n, c, hw = _sizes(x)
        k = 1.0 / hw
        # Work in (N, C, M). Per-instance scalars are (N, C, 1), per-channel ones (1, C, 1); the
        # full-size work is five reductions and two outputs, each written as a sum of
        # scalar x tensor terms. xh = r (x - mean) is never stored: it is folded into the scalars,
        # as ATen's group-norm kernels do.
        dz3, x3 = dz.reshape(n, c, hw), x.reshape(n, c, hw)
        r, mu = rstd.view(n, c, 1), mean.view(n, c, 1)
        rw = r if weight is None else r * weight.view(1, c, 1)
        need_x = need_x and (a is not None or p is not None)  # q alone does not depend on x
        p = torch.zeros_like(rw[:1]) if p is None else p.view(1, c, 1)  # (1, C, 1): zeros cost nothing
        q = torch.zeros_like(rw[:1]) if q is None else q.view(1, c, 1)
        rk = r * k

        def stats(u):  # <u>, <u xh> over M
            s = u.sum(2, keepdim=True)
            return s * k, torch.addcmul(_dot(u, x3), mu, s, value=-1).mul_(rk)

        e_dz, h_dz = stats(dz3)
        if a is None:
            c_dz, const_dz = p, q  # G = p dz;  d dz = p xh + q
        else:
            a3 = a.reshape(n, c, hw)
            e_a, h_a = stats(a3)
            # <a dx> / (r w) = <a dz> - <a><dz> - <a xh><dz xh>
            a_dx = torch.addcmul(torch.addcmul(_dot(a3, dz3).mul_(k), e_a, e_dz, value=-1), h_a, h_dz, value=-1)
            c_dz = torch.addcmul(p, rw, h_a, value=-1)  # p - r w <a xh>
            c_a = -rw * h_dz
            const_dz = torch.addcmul(q, rw, e_a, value=-1)  # q - r w <a>

        d_dy = d_x = d_w = None
        if need_dy:
            # d dz = r w a + c_dz xh + const_dz,  with xh = r x - r mean
            c_x = c_dz * r
            d_dy = torch.addcmul(torch.addcmul(const_dz, c_x, mu, value=-1), x3, c_x)
            if a is not None:
                d_dy.addcmul_(a3, rw)
            d_dy = d_dy.view(x.shape)
            if y is not None:  # the ReLU mask, in place (no second buffer of the activation's size)
                torch.ops.aten.threshold_backward.grad_input(d_dy, y, 0, grad_input=d_dy)
        if need_w and a is not None and weight is not None:
            d_w = (r * a_dx).sum(0).mul_(hw).view(c)
        if need_x:
            # d x = r (G - <G> - xh (<xh G> + r w <a dx / (r w)>)),  G = c_dz dz + c_a a
            m_G, t = c_dz * e_dz, c_dz * h_dz  # <G>, and <xh G> + <a dx>
            if a is not None:
                m_G.addcmul_(c_a, e_a)
                t.addcmul_(c_a, h_a).addcmul_(rw, a_dx)
            r_t = r * t
            d_x = torch.addcmul(torch.addcmul(m_G, r_t, mu, value=-1).mul_(-r), dz3, r * c_dz)
            if a is not None:
                d_x.addcmul_(a3, r * c_a)
            d_x = d_x.addcmul_(x3, r * r_t, value=-1).view(x.shape)
        return d_dy, d_x, d_w, None, None, None, None


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(u * v).sum(2, keepdim=True)`` for ``(N, C, M)`` tensors, as one batched matmul (no product tensor)."""
    n, c, m = u.shape
    return torch.bmm(u.reshape(n * c, 1, m), v.reshape(n * c, m, 1)).view(n, c, 1)


class _AvgPool2(torch.autograd.Function):
    """``F.avg_pool2d(x, 2, 2)`` whose backward is a node of its own, depending on the gradient only.

    PyTorch's double backward of ``avg_pool2d`` returns a zero tensor of the input's size for the
    input (the backward is linear in the gradient and ignores ``x``'s values) and back-propagates
    it; here that branch does not exist. The same numbers as ``F.avg_pool2d``'s derivatives, bit for bit.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)  # for its shape only; the norm has saved this very tensor already
        return F.avg_pool2d(x, 2, 2)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        if not torch.is_grad_enabled():  # a plain backward (no create_graph): no node for a second derivative
            return _pool_backward(dy, x)
        return _AvgPool2Backward.apply(dy, x.detach())  # x gives the shape only: no gradient path through it


def _pool_backward(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool2d(x, 2, 2)``'s backward at ``dy`` (ATen's kernel: ``x`` gives the shape only)."""
    return torch.ops.aten.avg_pool2d_backward(dy, x, [2, 2], [2, 2], [0, 0], False, True, None)


class _AvgPool2Backward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dy, x):
        return _pool_backward(dy, x)

    @staticmethod
    def backward(ctx, a):
        return F.avg_pool2d(a, 2, 2), None


def avg_pool2(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool2d(x, 2, 2)``, twice differentiable without a zero-filled branch (the same numbers); with
    ``dpd_cli.models.use_fused()`` off, ``F.avg_pool2d`` itself."""
    return _AvgPool2.apply(x) if use_fused() else F.avg_pool2d(x, 2, 2)


def instance_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5, relu: bool = False
) -> torch.Tensor:
    """``F.group_norm(x, C, weight, bias, eps)`` for ``x`` ``(N, C, *)``, twice differentiable in two nodes.

    ``weight`` and ``bias`` are ``(C,)`` or both ``None``; ``relu`` applies the ReLU inside the same two nodes.
    With ``dpd_cli.models.use_fused()`` off it is ``F.group_norm`` (then ``F.relu``) itself.
    """
    if not use_fused() or x.numel() <= 1 or (weight is None) != (bias is None):  # F.group_norm raises on one value
        y = F.group_norm(x, x.shape[1], weight, bias, eps)
        return F.relu(y) if relu else y
    return _InstanceNorm.apply(x, weight, bias, eps, relu)


class InstanceNorm(nn.GroupNorm):
    """``nn.GroupNorm(C, C)`` computed by :func:`instance_norm`: a subclass, so parameter names, state dicts,
    the flat layout and stored files are those of ``nn.GroupNorm``."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_channels, num_channels, eps=eps, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return instance_norm(x, self.weight, self.bias, self.eps)
