"""The instance norm (and 2x2 average pool) with analytic double backwards: the fused path against the
reference path (``F.group_norm``, ``F.avg_pool2d``, which the functions are with the fused path off) and
against a naive loop / the window means written out here (float64), plus finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpd_cli.models.norm import InstanceNorm, avg_pool2, instance_norm
from tests.helpers import fused

# (N, C, *spatial): odd sizes on purpose, H = W = 1 (one value per instance), N = 1, C = 1, 1-D and 3-D maps.
SHAPES = [
    (2, 3, 4, 5),
    (3, 2, 1, 1),
    (1, 4, 3, 5),
    (2, 1, 3, 5),
    (1, 1, 2, 3),
    (2, 3, 7),
    (2, 2, 2, 3, 2),
    (4, 5, 1, 2),
]


def _naive_norm(x, weight, bias, eps):
    """Per-(n, c) loop: biased variance, as GroupNorm; nothing shared with the package or F.group_norm."""
    out = []
    for n in range(x.shape[0]):
        rows = []
        for c in range(x.shape[1]):
            v = x[n, c]
            mu = v.sum() / v.numel()
            var = ((v - mu) ** 2).sum() / v.numel()
            z = (v - mu) / torch.sqrt(var + eps)
            rows.append(z if weight is None else z * weight[c] + bias[c])
        out.append(torch.stack(rows))
    return torch.stack(out)


def _group_norm(x, weight, bias, eps):
    return F.group_norm(x, x.shape[1], weight, bias, eps)


def _with_relu(fn):
    return lambda x, weight, bias, eps: torch.relu(fn(x, weight, bias, eps))


def _fused(relu=False):
    return lambda x, weight, bias, eps: instance_norm(x, weight, bias, eps, relu=relu)


def _derivatives(fn, x, weight, bias, gy, cot, eps=1e-5):
    """y, first derivatives (x, w, b) for cotangent gy, and the derivatives of <cot, first> w.r.t. (x, w, b, gy)."""
    inputs = [x] + ([weight, bias] if weight is not None else [])
    y = fn(x, weight, bias, eps)
    first = torch.autograd.grad(y, inputs, gy, create_graph=True)
    s = sum((g * c).sum() for g, c in zip(first, cot))
    second = torch.autograd.grad(s, inputs + [gy], allow_unused=True)
    # An input the first derivatives do not depend on (the bias) has no second derivative: zeros.
    second = [torch.zeros_like(t) if g is None else g for g, t in zip(second, inputs + [gy])]
    return [y, *first, *second]


def _inputs(shape, affine, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    x = (3 * rnd(*shape) + rnd(1)).requires_grad_(True)  # an offset mean, like conv outputs
    weight = rnd(c).requires_grad_(True) if affine else None
    bias = rnd(c).requires_grad_(True) if affine else None
    gy = rnd(*shape).requires_grad_(True)
    cot = [rnd(*shape)] + ([rnd(c), rnd(c)] if affine else [])
    return x, weight, bias, gy, cot


def _assert_same(actual, expected, tol=1e-12):
    # 1e-12 relative to the tensor's scale: with one or two values per instance some entries are
    # exactly zero in theory and cancellation noise (~1e-16 x scale) in both implementations.
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        scale = max(1.0, e.detach().abs().max().item())
        torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale, msg=lambda m, i=i: f"output {i}: {m}")


@pytest.mark.parametrize(
    "affine,relu", [(True, False), (False, False), (True, True)], ids=["affine", "plain", "affine+relu"]
)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_forward_first_and_second_derivatives_equal_group_norm_and_naive_loop(shape, affine, relu):
    args = _inputs(shape, affine, seed=sum(shape) * 7 + len(shape))
    with fused(True):
        ours = _derivatives(_fused(relu), *args)
    with fused(False):  # the reference path: F.group_norm (and F.relu), differentiated by PyTorch
        plain = _derivatives(_fused(relu), *args)
    wrap = _with_relu if relu else (lambda fn: fn)
    _assert_same(ours, plain)
    _assert_same(ours, _derivatives(wrap(_naive_norm), *args))


@pytest.mark.parametrize("relu", [False, True], ids=["norm", "norm+relu"])
def test_the_reference_path_is_torch_nn_functional_itself(relu):
    args = _inputs((2, 3, 4, 5), True, seed=8)
    with fused(False):
        plain = _derivatives(_fused(relu), *args)
    ref = _derivatives(_with_relu(_group_norm) if relu else _group_norm, *args)
    assert all(torch.equal(a, r) for a, r in zip(plain, ref, strict=True))
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 3, 3, 2, dtype=torch.float64)
    with fused(False):
        y = avg_pool2(x)
        (gx,) = torch.autograd.grad(y, [x], gy)
    assert torch.equal(y, F.avg_pool2d(x, 2, 2)) and torch.equal(
        gx, torch.autograd.grad(F.avg_pool2d(x, 2, 2), [x], gy)[0]
    )


@pytest.mark.parametrize(
    "affine,relu", [(True, False), (False, False), (True, True)], ids=["affine", "plain", "affine+relu"]
)
@pytest.mark.parametrize("shape", [(2, 3, 3, 5), (3, 2, 1, 1), (1, 1, 2, 3)], ids=["2x3x3x5", "3x2x1x1", "1x1x2x3"])
def test_gradcheck_and_gradgradcheck(shape, affine, relu):
    x, weight, bias, _, _ = _inputs(shape, affine, seed=1)
    inputs = (x, weight, bias) if affine else (x,)

    def fn(*t):
        return instance_norm(t[0], *(t[1:] if affine else (None, None)), relu=relu)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("relu", [False, True], ids=["norm", "norm+relu"])
@pytest.mark.parametrize("which", ["x", "weight", "bias", "x+weight"])
def test_second_derivatives_with_some_cotangents_absent(which, relu):
    # The double backward gets None for outputs nobody used; each subset must still be exact.
    x, weight, bias, gy, _ = _inputs((2, 3, 4, 3), True, seed=2)

    def second(fn):
        gx, gw, gb = torch.autograd.grad(fn(x, weight, bias, 1e-5), [x, weight, bias], gy, create_graph=True)
        picked = {
            "x": gx.square().sum(),
            "weight": gw.pow(3).sum(),
            "bias": gb.square().sum(),
            "x+weight": gx.square().sum() + gw.square().sum(),
        }[which]
        out = torch.autograd.grad(picked, [x, weight, gy], allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(out, [x, weight, gy])]

    _assert_same(second(_fused(relu)), second(_with_relu(_group_norm) if relu else _group_norm))


def test_only_x_requires_grad():
    x, weight, bias, gy, _ = _inputs((2, 3, 4, 3), True, seed=3)
    w, b = weight.detach(), bias.detach()

    def second(fn):
        (gx,) = torch.autograd.grad(fn(x, w, b, 1e-5), [x], gy, create_graph=True)
        return list(torch.autograd.grad(gx.square().sum(), [x, gy]))

    _assert_same(second(instance_norm), second(_group_norm))


def test_third_derivative_refuses_instead_of_being_wrong():
    x, weight, bias, gy, _ = _inputs((2, 3, 4, 3), True, seed=4)
    (gx,) = torch.autograd.grad(instance_norm(x, weight, bias), [x], gy, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        ggx.sum().backward()


def test_one_value_in_total_raises_like_group_norm():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        instance_norm(torch.randn(1, 1, 1, 1), None, None)


def _window_means(x: torch.Tensor) -> torch.Tensor:
    """The 2x2 average pool written out: each output pixel is the mean of its window (odd edges dropped)."""
    h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    t = x[:, :, :h, :w]
    return (t[:, :, 0::2, 0::2] + t[:, :, 0::2, 1::2] + t[:, :, 1::2, 0::2] + t[:, :, 1::2, 1::2]) / 4


@pytest.mark.parametrize(
    "shape", [(2, 3, 4, 6), (1, 2, 5, 7), (3, 1, 2, 2), (2, 4, 32, 32)], ids=["4x6", "5x7", "2x2", "32x32"]
)
def test_avg_pool2_equals_avg_pool2d_with_its_derivatives(shape):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    def derivatives(pool):
        y = pool(x)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64).requires_grad_(True)
        (gx,) = torch.autograd.grad(y, [x], gy, create_graph=True)
        cot = torch.randn(gx.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        (ggy,) = torch.autograd.grad((gx * cot).sum(), [gy])
        return [y, gx, ggy]

    with fused(True):
        ours = derivatives(avg_pool2)
    with fused(False):
        plain = derivatives(avg_pool2)
    # ATen's pool and pool backward on both paths: the same numbers, bit for bit.
    assert all(torch.equal(a, r) for a, r in zip(ours, plain, strict=True))
    for a, r in zip(ours, derivatives(_window_means), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-15, atol=1e-15)
    small = x.detach()[:1, :1, :6, :6].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(avg_pool2, (small,))
    assert torch.autograd.gradgradcheck(avg_pool2, (small,))


def test_avg_pool2_in_float32_is_the_window_means_to_float32_rounding():
    x = torch.randn(3, 5, 16, 12, generator=torch.Generator().manual_seed(3))
    exact = _window_means(x.double())
    # |x| < 4: every partial sum is below 16, where each of the three float32 additions rounds by at most
    # 2^-21; the quarter is exact, so the pooled value is within 3 * 2^-23 < 2^-21 of the true mean.
    assert x.abs().max() < 4
    for t in (x, x.transpose(2, 3)):  # contiguous and strided
        got = avg_pool2(t)
        want = exact if t.is_contiguous() else exact.transpose(2, 3)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2**-21)


def test_module_is_group_norm_with_the_same_state_and_bitwise_float32_training_math():
    torch.manual_seed(0)
    ours, plain = InstanceNorm(6), nn.GroupNorm(6, 6)
    assert isinstance(ours, nn.GroupNorm) and (ours.num_groups, ours.num_channels, ours.eps, ours.affine) == (
        6,
        6,
        1e-5,
        True,
    )
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    state = ours.state_dict()
    assert list(state) == list(plain.state_dict()) == ["weight", "bias"]
    plain.load_state_dict(state)
    x = torch.randn(4, 6, 5, 7)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), plain(xb)
    # Forward and plain backward run the very kernels nn.GroupNorm runs: experts train bit for bit as before.
    assert torch.equal(ya, yb)
    gy = torch.randn_like(ya)
    ya.backward(gy)
    yb.backward(gy)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(ours.weight.grad, plain.weight.grad) and torch.equal(ours.bias.grad, plain.bias.grad)
    assert "weight" not in dict(InstanceNorm(3, affine=False).named_parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "affine,relu", [(True, False), (False, False), (True, True)], ids=["affine", "plain", "affine+relu"]
)
@pytest.mark.parametrize("shape", [(4, 16, 8, 8), (3, 2, 1, 1), (2, 5, 3, 7)], ids=["4x16x8x8", "3x2x1x1", "2x5x3x7"])
def test_cuda_equals_group_norm(shape, affine, relu):
    cpu_args = _inputs(shape, affine, seed=6)

    def to_cuda(t):
        return None if t is None else t.detach().cuda().requires_grad_(t.requires_grad)

    x, weight, bias, gy = (to_cuda(t) for t in cpu_args[:4])
    cot = [c.cuda() for c in cpu_args[4]]
    ours = _derivatives(_fused(relu), x, weight, bias, gy, cot)
    assert all(t.is_cuda for t in ours)
    _assert_same(ours, _derivatives(_with_relu(_group_norm) if relu else _group_norm, x, weight, bias, gy, cot))
    _assert_same([t.cpu() for t in ours], _derivatives(_fused(relu), *cpu_args), tol=1e-11)  # and CUDA equals CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_avg_pool2_equals_avg_pool2d():
    x = torch.randn(3, 4, 6, 8, dtype=torch.float64, device="cuda", requires_grad=True)
    gy = torch.randn(3, 4, 3, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    cot = torch.randn_like(x)

    def derivatives(pool):
        (gx,) = torch.autograd.grad(pool(x), [x], gy, create_graph=True)
        return [pool(x), gx, *torch.autograd.grad((gx * cot).sum(), [gy])]

    _assert_same(derivatives(avg_pool2), derivatives(lambda t: F.avg_pool2d(t, 2, 2)))


def test_a_plain_backward_makes_no_second_derivative_nodes_and_matches_pytorchs_layers(monkeypatch):
    """Expert/eval training and low memory's forward sweep (no create_graph) skip the twice-differentiable nodes."""
    from dpd_cli.models import conv as conv_module
    from dpd_cli.models import norm as norm_module

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    w, b = torch.randn(5, 3, 3, 3, requires_grad=True), torch.randn(5, requires_grad=True)
    nw, nb = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    gy = torch.randn(2, 5, 4, 4)

    def ours():
        return avg_pool2(instance_norm(conv_module.conv2d(x, w, b, padding=1), nw, nb, relu=True))

    def theirs():
        return F.avg_pool2d(F.relu(F.group_norm(F.conv2d(x, w, b, padding=1), 5, nw, nb)), 2, 2)

    twice = torch.autograd.grad(ours(), (w, b, nw, nb), gy, create_graph=True)  # through the differentiable nodes
    plain_ref = torch.autograd.grad(theirs(), (w, b, nw, nb), gy)

    def refuse(*args):
        raise AssertionError("a second-derivative node was built in a plain backward")

    for fn in (conv_module._Conv2dBackward, norm_module._InstanceNormBackward, norm_module._AvgPool2Backward):
        monkeypatch.setattr(fn, "apply", refuse)
    plain = torch.autograd.grad(ours(), (w, b, nw, nb), gy)
    for p, t, r in zip(plain, twice, plain_ref, strict=True):
        assert torch.equal(p, t.detach())  # the same kernels either way
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)  # and PyTorch's own layers' gradients
    assert torch.equal(plain[0], plain_ref[0]) and torch.equal(
        plain[2], plain_ref[2]
    )  # conv weight, norm weight: bit for bit
