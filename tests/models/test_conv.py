"""The student's convolution (``dpd_cli.models.conv``): first and second derivatives against PyTorch's own
``F.conv2d`` (which differentiates itself, and which ``conv2d`` is with the fused path off), against a
convolution written out in the test, and against finite differences, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpd_cli.models.conv import conv2d
from tests.helpers import fused

D = torch.float64


def _inputs(shape, cout, pad, bias, seed=0, groups=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=D).requires_grad_(True)
    w = torch.randn(cout, shape[1] // groups, 3, 3, generator=g, dtype=D).requires_grad_(True)
    b = torch.randn(cout, generator=g, dtype=D).requires_grad_(True) if bias else None
    return x, w, b


def _naive_conv(x, w, b, pad, groups=1):
    """Stride-1 cross-correlation as a sum over the kernel's offsets (shifted slices times weights): nothing
    shared with F.conv2d's kernels; autograd differentiates it twice like any elementwise expression. With
    ``groups``: each group's channels convolved on their own, the outputs side by side."""
    if groups > 1:
        parts = zip(x.chunk(groups, 1), w.chunk(groups, 0), b.chunk(groups) if b is not None else [None] * groups)
        return torch.cat([_naive_conv(xg, wg, bg, pad) for xg, wg, bg in parts], 1)
    xp = F.pad(x, (pad, pad, pad, pad))
    kh, kw = w.shape[2:]
    h, wd = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
    out = sum(
        torch.einsum("nchw,oc->nohw", xp[:, :, i : i + h, j : j + wd], w[:, :, i, j])
        for i in range(kh)
        for j in range(kw)
    )
    return out if b is None else out + b.view(1, -1, 1, 1)


CASES = [
    ((2, 3, 6, 5), 4, 1, True, 1),
    ((3, 1, 7, 7), 2, 3, True, 1),
    ((1, 2, 4, 9), 3, 0, False, 1),
    ((2, 2, 3, 3), 5, 1, False, 1),
    ((2, 6, 5, 5), 9, 1, True, 3),  # three students side by side (dpd distill --seeds)
    ((1, 4, 4, 6), 4, 0, False, 2),
]


@pytest.mark.parametrize("shape,cout,pad,bias,groups", CASES)
def test_gradcheck_and_gradgradcheck(shape, cout, pad, bias, groups):
    x, w, b = _inputs(shape, cout, pad, bias, groups=groups)
    args = (x, w, b) if bias else (x, w)
    fn = (lambda x, w, b: conv2d(x, w, b, pad, groups)) if bias else (lambda x, w: conv2d(x, w, None, pad, groups))
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("shape,cout,pad,bias,groups", CASES)
@pytest.mark.parametrize("cotangents", ["all", "gx", "gw", "gb", "gx+gw"])
def test_second_derivatives_equal_pytorchs_and_the_written_out_convolution(shape, cout, pad, bias, groups, cotangents):
    """The output, the gradient and the gradient of any mix of (gx, gw, gb): the fused path against the
    reference path (F.conv2d) and against the convolution written out above, to 1e-12."""
    x, w, b = _inputs(shape, cout, pad, bias, seed=1, groups=groups)
    params = [x, w] + ([b] if bias else [])

    def derivatives(conv):
        y = conv()
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=D).requires_grad_(True)
        grads = torch.autograd.grad(y, params, gy, create_graph=True)
        picked = {"gx": [0], "gw": [1], "gb": [2] if bias else [], "gx+gw": [0, 1], "all": list(range(len(grads)))}[
            cotangents
        ]
        if not picked:
            return [y]
        cots = [torch.randn(grads[i].shape, generator=torch.Generator().manual_seed(4 + i), dtype=D) for i in picked]
        s = sum((grads[i] * c).sum() for i, c in zip(picked, cots, strict=True))
        return [y, *grads, *torch.autograd.grad(s, params + [gy], allow_unused=True)]

    with fused(True):
        ours = derivatives(lambda: conv2d(x, w, b, pad, groups))
    with fused(False):
        plain = derivatives(lambda: conv2d(x, w, b, pad, groups))
    naive = derivatives(lambda: _naive_conv(x, w, b, pad, groups))
    for ref in (plain, naive):
        assert len(ours) == len(ref)
        for a, r in zip(ours, ref, strict=True):
            if r is None or (a is None and not r.abs().max() > 0):  # PyTorch may return zeros where we return None
                continue
            assert a is not None
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_the_reference_path_is_f_conv2d_itself():
    x, w, b = _inputs((2, 3, 6, 5), 4, 1, True, seed=2)
    gy = torch.randn(2, 4, 6, 5, dtype=D)
    with fused(False):
        ours = [conv2d(x, w, b, 1), *torch.autograd.grad(conv2d(x, w, b, 1), [x, w, b], gy)]
    ref = [F.conv2d(x, w, b, padding=1), *torch.autograd.grad(F.conv2d(x, w, b, padding=1), [x, w, b], gy)]
    assert all(torch.equal(a, r) for a, r in zip(ours, ref, strict=True))


def test_first_derivatives_of_input_and_weight_are_pytorchs_bit_for_bit_in_float32():
    x = torch.randn(4, 3, 10, 10, requires_grad=True)
    w = torch.randn(8, 3, 3, 3, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    gy = torch.randn(4, 8, 10, 10)
    ours = torch.autograd.grad(conv2d(x, w, b, 1), [x, w, b], gy)  # the fused path (the default)
    ref = torch.autograd.grad(F.conv2d(x, w, b, padding=1), [x, w, b], gy)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    torch.testing.assert_close(ours[2], ref[2])  # a plain sum: equal up to summation order
    assert torch.equal(conv2d(x, w, b, 1), F.conv2d(x, w, b, padding=1))


def test_third_derivative_refuses_instead_of_being_wrong():
    x, w, b = _inputs((1, 2, 4, 4), 2, 1, True)
    gy = torch.randn(1, 2, 4, 4, dtype=D, requires_grad=True)
    (gx,) = torch.autograd.grad(conv2d(x, w, b, 1), [x], gy, create_graph=True)
    (ggw,) = torch.autograd.grad(gx.square().sum(), [w], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        ggw.sum().backward()
