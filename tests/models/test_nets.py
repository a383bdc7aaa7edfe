"""Networks: output shapes at every supported resolution, MTT's ConvNet size, specs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpd_cli.models import FlatModel, ModelSpec, build_model, default_depth
from dpd_cli.models.norm import InstanceNorm
from tests.helpers import tiny_spec

SIZES = [(1, 28), (3, 32), (3, 64)]


@pytest.fixture(autouse=True)
def _plain_conv(monkeypatch):
    # oneDNN builds a kernel per new shape, which costs seconds on a small CPU; the results are the same.
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)


@pytest.mark.parametrize("name", ["convnet", "resnet18", "vgg11", "alexnet"])
@pytest.mark.parametrize("channels,side", SIZES, ids=[f"{c}x{s}" for c, s in SIZES])
def test_forward_shape_and_input_dependence(name, channels, side):
    spec = ModelSpec(name, channels, (side, side), 10, width=8, depth=default_depth((side, side)))
    net = build_model(spec)
    x = torch.randn(2, channels, side, side)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 10) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    # Each image's logits depend on that image (a norm over a 1x1 map would make them constant).
    assert not torch.allclose(y[0], y[1], atol=1e-6)


def test_default_depth():
    assert default_depth((28, 28)) == 3
    assert default_depth((32, 32)) == 3
    assert default_depth((64, 64)) == 4
    assert default_depth((16, 16)) == 2
    assert default_depth((8, 8)) == 1
    assert default_depth((64, 32)) == 3  # the short side decides
    assert default_depth((512, 512)) == 5  # capped


def test_convnet_cifar10_parameter_count_is_mtt():
    net = build_model(ModelSpec("convnet", 3, (32, 32), 10, width=128, depth=3))
    assert sum(p.numel() for p in net.parameters()) == 320_010
    names = [n for n, _ in net.named_parameters()]
    assert names[:4] == ["conv1.weight", "conv1.bias", "norm1.weight", "norm1.bias"]
    assert names[-2:] == ["fc.weight", "fc.bias"]
    assert isinstance(net.norm1, nn.GroupNorm) and net.norm1.num_groups == 128
    assert isinstance(net.pool1, nn.AvgPool2d)


def test_convnet_grayscale_28_is_padded_to_32():
    a = build_model(ModelSpec("convnet", 1, (28, 28), 10, width=8, depth=3))
    b = build_model(ModelSpec("convnet", 1, (32, 32), 10, width=8, depth=3))
    assert a.conv1.padding == (3, 3)
    assert a.fc.in_features == b.fc.in_features == 8 * 4 * 4


def test_convnet_variants():
    spec = ModelSpec("convnet", 3, (8, 8), 3, width=4, depth=2, norm="batch", pool="max")
    net = build_model(spec)
    assert isinstance(net.norm1, nn.BatchNorm2d) and isinstance(net.pool2, nn.MaxPool2d)
    none = build_model(ModelSpec("convnet", 3, (8, 8), 3, width=4, depth=2, norm="none"))
    assert isinstance(none.norm1, nn.Identity)
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_convnet_too_deep():
    with pytest.raises(ValueError, match="too deep"):
        build_model(ModelSpec("convnet", 3, (8, 8), 3, width=4, depth=4))


def test_tiny_spec_forward_and_backward():
    net = build_model(tiny_spec())
    y = net(torch.randn(5, 1, 8, 8))
    assert y.shape == (5, 3)
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_spec_round_trip_and_tag():
    spec = ModelSpec("convnet", 3, (32, 32), 10, width=64, depth=3, norm="batch", pool="max")
    d = spec.to_dict()
    assert d["image_size"] == [32, 32]
    assert ModelSpec.from_dict(d) == spec
    assert spec.tag() == "convnet-w64-d3-batch-max"
    assert ModelSpec("vgg11", 3, (32, 32), 10).tag() == "vgg11-instance"


def test_seeded_build_is_reproducible():
    torch.manual_seed(3)
    a = build_model(tiny_spec())
    torch.manual_seed(3)
    b = build_model(tiny_spec())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _with_plain_group_norm(net: nn.Module) -> nn.Module:
    """``net`` as the networks were built before the fused norm: every instance norm an ``nn.GroupNorm(C, C)``."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, InstanceNorm):
                plain = nn.GroupNorm(child.num_channels, child.num_channels, eps=child.eps, affine=child.affine)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain)
    return net


@pytest.mark.parametrize("name", ["convnet", "resnet18", "vgg11"])
def test_instance_norm_keeps_parameter_names_state_dict_and_flat_layout(name):
    """Stored trajectories and files name and order parameters as nn.GroupNorm did: they still load and give the same outputs."""
    spec = ModelSpec(name, 1, (28, 28), 10, width=8, depth=3)
    torch.manual_seed(4)
    net = build_model(spec)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    # The ConvNet's student runs forward_flat; its module, trained once-differentiated, keeps nn.GroupNorm.
    assert norms and all(type(m) is (nn.GroupNorm if name == "convnet" else InstanceNorm) for m in norms)
    torch.manual_seed(4)
    old = _with_plain_group_norm(build_model(spec))
    assert not any(isinstance(m, InstanceNorm) for m in old.modules())
    new_state, old_state = net.state_dict(), old.state_dict()
    assert list(new_state) == list(old_state)
    assert all(new_state[k].shape == old_state[k].shape and torch.equal(new_state[k], old_state[k]) for k in old_state)
    fm_new, fm_old = FlatModel(net), FlatModel(old)
    assert fm_new.layout == fm_old.layout and fm_new.n_params == fm_old.n_params
    # Parameters saved by the old networks (a trained-looking flat vector) load and compute the same.
    theta = fm_old.flatten() + 0.1 * torch.randn(fm_old.n_params)
    fm_old.load_(theta)
    fm_new.module.load_state_dict(old.state_dict(), strict=True)
    assert torch.equal(fm_new.flatten(), theta)
    x = torch.randn(3, 1, 28, 28)
    net.train(), old.train()
    assert torch.equal(net(x), old(x))


def test_convnet_instance_norm_gives_bitwise_the_old_outputs_and_gradients():
    """The module's nn.GroupNorm and dpd's norm Function (the student's, on the module path before) run the
    same kernels: same numbers, bit for bit, in float32, so expert and evaluation training did not change
    with the norm."""
    spec = ModelSpec("convnet", 3, (16, 16), 4, width=8, depth=2)
    torch.manual_seed(5)
    net = build_model(spec)
    torch.manual_seed(5)
    old = build_model(spec)
    for d in (1, 2):  # the ConvNet module as it was: dpd's norm Function in place of nn.GroupNorm
        norm = getattr(old, f"norm{d}")
        assert type(norm) is nn.GroupNorm
        fused = InstanceNorm(norm.num_channels)
        fused.load_state_dict(norm.state_dict())
        setattr(old, f"norm{d}", fused)
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    out_new, out_old = net(x), old(x)
    assert torch.equal(out_new, out_old)
    for out in (out_new, out_old):
        torch.nn.functional.cross_entropy(out, y).backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(net.parameters(), old.parameters(), strict=True))


@pytest.mark.parametrize("name", ["convnet", "resnet18", "vgg11", "alexnet"])
def test_the_networks_are_plain_torch_nn_modules(name):
    """Experts and evaluation train PyTorch's own layers; only ResNet-18 and VGG-11, their own students, use
    dpd's instance norm (an nn.GroupNorm subclass)."""
    net = build_model(ModelSpec(name, 1, (28, 28), 10, width=8, depth=3))
    layers = [m for m in net.modules() if not list(m.children())]  # the leaves: containers only call them
    kinds = {type(m) for m in layers if type(m).__module__.startswith("dpd_cli")}
    assert kinds == ({InstanceNorm} if name in ("resnet18", "vgg11") else set())
    if name == "convnet":
        assert {type(net.conv1), type(net.norm1), type(net.act1), type(net.pool1)} == {
            nn.Conv2d,
            nn.GroupNorm,
            nn.ReLU,
            nn.AvgPool2d,
        }
