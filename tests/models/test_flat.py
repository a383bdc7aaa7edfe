"""The flat-parameter view: forward, layout, views, in-place load, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpd_cli.models import FlatModel, ModelSpec, build_model
from tests.helpers import assert_close, tiny_spec


def _fm(dtype=torch.float32) -> FlatModel:
    return FlatModel(build_model(tiny_spec()).to(dtype))


def test_forward_equals_module():
    fm = _fm()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(fm(fm.flatten(), x), fm.module(x))


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
        ["conv1.weight", [4, 1, 3, 3]], ["conv1.bias", [4]], ["norm1.weight", [4]], ["norm1.bias", [4]],
        ["conv2.weight", [4, 4, 3, 3]], ["conv2.bias", [4]], ["norm2.weight", [4]], ["norm2.bias", [4]],
        ["fc.weight", [3, 16]], ["fc.bias", [3]],
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

    The reference is the module with every norm a plain ``nn.GroupNorm`` (PyTorch differentiating
    ``F.group_norm`` itself), so the fused norm's double backward is checked in the student's setting.
    """
    import copy

    from torch import nn
    from torch.func import functional_call

    from dpd_cli.models.norm import InstanceNorm

    torch.manual_seed(0)
    spec = ModelSpec("convnet", 1, (28, 28), 3, width=4, depth=2, norm=norm, pool=pool)
    fm = FlatModel(build_model(spec).double())
    assert fm.module.supports_forward_flat
    plain = copy.deepcopy(fm.module)
    for d in (1, 2):
        if isinstance(getattr(plain, f"norm{d}"), InstanceNorm):
            setattr(plain, f"norm{d}", nn.GroupNorm(4, 4).double())
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    theta0 = fm.flatten() + 0.1 * torch.randn(fm.n_params, dtype=torch.float64)  # norm weights away from 1

    def meta(forward):
        theta = theta0.clone().requires_grad_(True)
        ce = torch.nn.functional.cross_entropy(forward(theta, x), y)
        (g,) = torch.autograd.grad(ce, theta, create_graph=True)
        return torch.autograd.grad((g * g).sum(), [x, theta])

    fast = meta(fm)
    module_path = meta(lambda theta, xx: functional_call(fm.module, fm.unflatten(theta), (xx,)))
    reference = meta(lambda theta, xx: functional_call(plain, fm.unflatten(theta), (xx,)))
    for a, b, c in zip(fast, module_path, reference):
        atol = 1e-14 * float(c.abs().max())  # float64 rounding at the gradient's scale (cancellation near zeros)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=atol)
        torch.testing.assert_close(b, c, rtol=1e-12, atol=atol)


def test_batchnorm_convnet_uses_functional_call():
    spec = ModelSpec("convnet", 1, (8, 8), 3, width=4, depth=2, norm="batch")
    fm = FlatModel(build_model(spec))
    assert not fm.module.supports_forward_flat
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(fm(fm.flatten(), x), fm.module(x))


def _node_kinds(out: torch.Tensor) -> list[str]:
    """The class names of every autograd node behind ``out``."""
    seen, stack, kinds = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds.append(type(node).__name__)
        stack.extend(f for f, _ in node.next_functions)
    return kinds


@pytest.mark.parametrize("path", ["forward_flat", "module"])
def test_convnet_student_runs_the_fused_norm_and_the_module_pytorchs_group_norm(path):
    # The distillation student (forward_flat) differentiates twice: dpd's norm with its second derivative.
    # Expert/evaluation training (the module) differentiates once: nn.GroupNorm's own node, the same kernels
    # (test_norm: bit for bit) without a Python node, which a GPU pays for in launch time at small batches.
    fm = _fm()
    x = torch.randn(2, 1, 8, 8)
    out = fm(fm.flatten().requires_grad_(True), x) if path == "forward_flat" else fm.module(x)
    kinds = _node_kinds(out)
    if path == "forward_flat":
        assert kinds.count("_InstanceNormBackward") == 2
        assert not any("GroupNorm" in k for k in kinds)
    else:
        assert kinds.count("NativeGroupNormBackward0") == 2 and "_InstanceNormBackward" not in kinds
    # On the CPU both paths also run the student's convolution (its bias gradient a plain sum) and pool.
    assert kinds.count("_Conv2dBackward") == 2 and "ConvolutionBackward0" not in kinds
    assert kinds.count("_AvgPool2Backward") == 2
    if path == "forward_flat":  # the student also folds the ReLU into the norm
        assert "ReluBackward0" not in kinds and "AvgPool2DBackward0" not in kinds


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_module_path_runs_pytorchs_convolution_norm_and_pool():
    """Expert and evaluation training on a GPU: no Python autograd node for the convolution, norm or pool."""
    fm = FlatModel(build_model(tiny_spec()).cuda())
    out = fm.module(torch.randn(2, 1, 8, 8, device="cuda"))
    kinds = _node_kinds(out)
    assert kinds.count("ConvolutionBackward0") == 2 and kinds.count("AvgPool2DBackward0") == 2
    assert kinds.count("NativeGroupNormBackward0") == 2
    assert not {"_Conv2dBackward", "_InstanceNormBackward", "_AvgPool2Backward"} & set(kinds)  # dpd's Functions
