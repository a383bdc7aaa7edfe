"""The flat-parameter view: forward, layout, views, in-place load, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpd_cli.models import FlatModel, ModelSpec, build_model
from tests.helpers import assert_close, fused, tiny_spec


def _fm(dtype=torch.float32) -> FlatModel:
    return FlatModel(build_model(tiny_spec()).to(dtype))


@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "reference"])
def test_forward_equals_module(use_fused):
    # The student's forward runs the very kernels of the module's torch.nn layers, on either path.
    fm = _fm()
    x = torch.randn(4, 1, 8, 8)
    with fused(use_fused):
        assert torch.equal(fm(fm.flatten(), x), fm.module(x))


@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("norm", ["instance", "none", "batch"])
def test_k_members_at_once_equal_each_member_on_its_own(use_fused, norm):
    """(K, P) parameters on (K, n, ...) images: member k's logits and their first and second derivatives
    are those of the network at theta[k] on x[k] alone (the wide grouped network, or a loop with batch norm)."""
    fm = FlatModel(build_model(ModelSpec("convnet", 2, (8, 8), 3, width=4, depth=2, norm=norm)).double())
    g = torch.Generator().manual_seed(0)
    thetas = (torch.randn(3, fm.n_params, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)
    x = torch.randn(3, 5, 2, 8, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.randint(0, 3, (3, 5), generator=g)
    v = torch.randn(3, fm.n_params, generator=g, dtype=torch.float64)

    def derivatives(logits, theta):  # logits, grad_theta CE, and d<v, grad_theta CE>/d(theta, x)
        (gt,) = torch.autograd.grad(
            F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"), theta, create_graph=True
        )
        return [logits, gt, *torch.autograd.grad((gt * v).sum(), [thetas, x])]

    with fused(use_fused):
        ours = derivatives(fm(thetas, x), thetas)
        rows = [thetas[k] for k in range(3)]
        alone = derivatives(torch.stack([fm(rows[k], x[k]) for k in range(3)]), thetas)
    assert ours[0].shape == (3, 5, 3)
    for a, r in zip(ours, alone, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_flatten_is_a_detached_copy_in_parameter_order():
    fm = _fm()
    flat = fm.flatten()
    params = list(fm.module.parameters())
    assert flat.shape == (fm.n_params,) == (sum(p.numel() for p in params),)
    assert not flat.requires_grad
    assert torch.equal(flat, torch.cat([p.detach().reshape(-1) for p in params]))
    flat.zero_()
    assert not all((p == 0).all() for p in params)  # the module is untouched


def test_layout():
    fm = _fm()
    # conv(1->4, 3x3), GN(4), conv(4->4), GN(4), fc(4*2*2 -> 3)
    assert fm.layout == [
        ["conv1.weight", [4, 1, 3, 3]],
        ["conv1.bias", [4]],
        ["norm1.weight", [4]],
        ["norm1.bias", [4]],
        ["conv2.weight", [4, 4, 3, 3]],
        ["conv2.bias", [4]],
        ["norm2.weight", [4]],
        ["norm2.bias", [4]],
        ["fc.weight", [3, 16]],
        ["fc.bias", [3]],
    ]
    offsets = [layer.offset for layer in fm.layers]
    numels = [layer.numel for layer in fm.layers]
    assert offsets == [0, 36, 40, 44, 48, 192, 196, 200, 204, 252]
    assert fm.n_params == 255 == offsets[-1] + numels[-1]


def test_unflatten_views_map_onto_the_right_parameters():
    fm = _fm()
    flat = fm.flatten()
    views = fm.unflatten(flat)
    assert list(views) == [n for n, _ in fm.module.named_parameters()]
    for (name, p), layer in zip(fm.module.named_parameters(), fm.layers):
        v = views[name]
        assert v.shape == p.shape and torch.equal(v, p.detach())
        assert v.data_ptr() == flat[layer.offset :].data_ptr()  # a view, not a copy
    flat[fm.layers[-1].offset] = 123.0
    assert views["fc.bias"][0] == 123.0


def test_load_round_trip():
    fm = _fm()
    original = fm.flatten()
    new = torch.randn(fm.n_params)
    fm.load_(new)
    assert torch.equal(fm.flatten(), new)
    assert torch.equal(fm.module.fc.bias.detach(), new[-3:])
    assert torch.equal(fm.module.conv1.weight.detach(), new[:36].view(4, 1, 3, 3))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(fm.module(x), fm(new, x))
    fm.load_(original)
    assert torch.equal(fm.flatten(), original)


def test_layer_ids():
    fm = _fm()
    ids = fm.layer_ids()
    assert ids.shape == (fm.n_params,) and ids.dtype == torch.int64
    assert torch.equal(torch.bincount(ids), torch.tensor([layer.numel for layer in fm.layers]))
    for i, layer in enumerate(fm.layers):
        assert (ids[layer.offset : layer.offset + layer.numel] == i).all()
    # boundaries: exactly where the layer index changes
    changes = (ids[1:] != ids[:-1]).nonzero().flatten() + 1
    assert changes.tolist() == [layer.offset for layer in fm.layers[1:]]
    assert ids[0] == 0 and ids[-1] == len(fm.layers) - 1


def test_gradient_through_flat_vector_equals_module_gradients():
    fm = _fm(torch.float64)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    flat = fm.flatten().requires_grad_(True)
    (g_flat,) = torch.autograd.grad(F.cross_entropy(fm(flat, x), y), flat)
    F.cross_entropy(fm.module(x), y).backward()
    g_module = torch.cat([p.grad.reshape(-1) for p in fm.module.parameters()])
    assert_close(g_flat, g_module, rtol=1e-12, atol=1e-14)
    assert g_flat.abs().sum() > 0


def test_functional_call_leaves_module_parameters_alone():
    fm = _fm()
    before = fm.flatten()
    fm(torch.randn(fm.n_params), torch.randn(2, 1, 8, 8))
    assert torch.equal(fm.flatten(), before)


@pytest.mark.parametrize("norm,pool", [("instance", "avg"), ("none", "max"), ("instance", "max")])
def test_convnet_fast_path_equals_functional_call_with_double_backward(norm, pool):
    """ConvNet.forward_flat must match functional_call, including the second-order terms distillation uses.

    The reference is the module itself through ``functional_call``: plain ``torch.nn`` layers, which
    PyTorch differentiates twice. ``forward_flat`` is checked on both paths of ``use_fused()``.
    """
    from torch.func import functional_call

    torch.manual_seed(0)
    spec = ModelSpec("convnet", 1, (28, 28), 3, width=4, depth=2, norm=norm, pool=pool)
    fm = FlatModel(build_model(spec).double())
    assert fm.module.supports_forward_flat
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    theta0 = fm.flatten() + 0.1 * torch.randn(fm.n_params, dtype=torch.float64)  # norm weights away from 1

    def meta(forward):
        theta = theta0.clone().requires_grad_(True)
        ce = torch.nn.functional.cross_entropy(forward(theta, x), y)
        (g,) = torch.autograd.grad(ce, theta, create_graph=True)
        return torch.autograd.grad((g * g).sum(), [x, theta])

    with fused(True):
        fast = meta(fm)
    with fused(False):
        plain = meta(fm)
    reference = meta(lambda theta, xx: functional_call(fm.module, fm.unflatten(theta), (xx,)))
    for a, b, c in zip(fast, plain, reference):
        atol = 1e-14 * float(c.abs().max())  # float64 rounding at the gradient's scale (cancellation near zeros)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=atol)
        torch.testing.assert_close(b, c, rtol=1e-12, atol=atol)


def test_batchnorm_convnet_uses_functional_call():
    spec = ModelSpec("convnet", 1, (8, 8), 3, width=4, depth=2, norm="batch")
    fm = FlatModel(build_model(spec))
    assert not fm.module.supports_forward_flat
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(fm(fm.flatten(), x), fm.module(x))
