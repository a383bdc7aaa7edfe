"""K networks trained as one ``Stack`` end where K separate trainings end (float64 to 1e-10, float32 to rounding).

The reference is the plain one-network loop, written out here: ``torch.manual_seed(seed)`` then the network,
``torch.optim.SGD``, the shuffle from ``Generator(seed)`` and one DSA seed per batch from ``Random(seed)``.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpd_cli.artifacts.experts import TRAJECTORY, expert_path
from dpd_cli.config.settings import ExpertSettings, resolve
from dpd_cli.core.augment import dsa
from dpd_cli.core.train import Stack, accuracy, sgd, train_epoch
from dpd_cli.io.storage import load_tensors
from dpd_cli.models import ModelSpec, build_model
from dpd_cli.models.norm import InstanceNorm
from dpd_cli.recipes import evaluate as E
from dpd_cli.recipes import experts as experts_engine
from tests.helpers import tiny_spec

SEEDS, LRS = [3, 5, 8], [0.05, 0.02, 0.1]


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _alone(spec, x, y, lr, seed, epochs, batch=5, momentum=0.9, weight_decay=5e-4, decay_after=None):
    """One network trained alone; after epoch ``decay_after`` a new optimiser at lr x 0.1 (momentum restarts)."""
    torch.manual_seed(seed)
    net = build_model(spec)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    shuffles, dsa_seeds, losses = torch.Generator().manual_seed(seed), random.Random(seed), []
    for epoch in range(1, epochs + 1):
        net.train()
        perm, total = torch.randperm(len(x), generator=shuffles), 0.0
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(net(dsa(x[idx], dsa_seeds.getrandbits(63))), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total)
        if epoch == decay_after:
            opt = torch.optim.SGD(net.parameters(), lr=lr * 0.1, momentum=momentum, weight_decay=weight_decay)
    return net, losses


def _data(k: int, n: int = 12, side: int = 8, classes: int = 3, channels: int = 1):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, channels, side, side, generator=g, dtype=torch.get_default_dtype()) for _ in range(k)]
    return xs, [torch.arange(classes).repeat(n // classes)[torch.randperm(n, generator=g)] for _ in range(k)]


def _flat(net) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


SPECS = {
    "convnet": tiny_spec(),
    "convnet-batchnorm-maxpool": ModelSpec("convnet", 1, (8, 8), 3, 4, 2, norm="batch", pool="max"),
    "convnet-no-norm": ModelSpec("convnet", 1, (8, 8), 3, 4, 2, norm="none"),
    "alexnet": ModelSpec("alexnet", 1, (8, 8), 3),
}


@pytest.mark.parametrize("name", SPECS)
def test_a_stack_trains_each_member_as_it_trains_alone(float64, name):
    spec, (xs, ys) = SPECS[name], _data(3)
    nets = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        nets.append(build_model(spec))
    stack = Stack(nets)
    opt = sgd(stack, LRS, 0.9, 5e-4)
    gens, rngs = [torch.Generator().manual_seed(s) for s in SEEDS], [random.Random(s) for s in SEEDS]
    for _ in range(2):
        losses, correct = train_epoch(stack, opt, xs, ys, 5, gens, rngs, True)
    rows = stack.flatten()
    for k, (x, y, lr, seed) in enumerate(zip(xs, ys, LRS, SEEDS)):
        alone, alone_losses = _alone(spec, x, y, lr, seed, 2)
        torch.testing.assert_close(rows[k], _flat(alone), rtol=0, atol=1e-10)
        assert float(losses[k]) == pytest.approx(alone_losses[-1], abs=1e-10)
        for (n, b), want in zip(stack.buffers.items(), dict(alone.named_buffers()).values()):  # batch norm's
            torch.testing.assert_close(b[k], want, rtol=0, atol=1e-10, msg=n)
        assert accuracy(stack, x, y)[k] == accuracy(alone, x, y)
        assert 0 <= int(correct[k]) <= len(y)


def test_dpd_instance_norm_of_resnet_and_vgg_runs_stacked(float64):
    # ResNet-18 and VGG-11 use dpd's fused instance norm (an autograd.Function vmap cannot batch): a Stack
    # runs torch.nn.functional's instead. The same gradients as the fused one, member by member.
    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), InstanceNorm(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    (xs, ys), nets = _data(3), [net(s) for s in SEEDS]
    stack = Stack([net(s) for s in SEEDS])
    sum(F.cross_entropy(out, y) for out, y in zip(stack(torch.stack(xs)), ys)).backward()
    for k, (alone, x, y) in enumerate(zip(nets, xs, ys)):
        F.cross_entropy(alone(x), y).backward()
        for (name, p), q in zip(stack.params.items(), alone.parameters()):
            torch.testing.assert_close(p.grad[k], q.grad, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_evaluation_networks_trained_together_equal_those_trained_alone(dtype, tol):
    # E = 4: 5 epochs, the lr drop (and momentum restart) after the 4th; 12 images in batches of 5, 5, 2.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        xs, ys = _data(3)
        ys[1] = F.softmax(torch.randn(12, 3, generator=torch.Generator().manual_seed(1)), 1)  # soft labels beside hard
        s = resolve("evaluate", {"batch": 5, "threads": 1})
        seen = []
        stack, diverged = E._train(
            tiny_spec(), xs, ys, 4, LRS, s, SEEDS, torch.device("cpu"), lambda ep, loss: seen.append(loss.clone())
        )
        assert diverged == [None] * 3 and len(seen) == 5
        for k in range(3):
            alone, losses = _alone(tiny_spec(), xs[k], ys[k], LRS[k], SEEDS[k], 5, decay_after=E.epochs_run(4)[1])
            torch.testing.assert_close(stack.flatten()[k], _flat(alone), rtol=tol, atol=tol)
            torch.testing.assert_close([float(loss[k]) for loss in seen], losses, rtol=tol, atol=tol)
    finally:
        torch.set_default_dtype(previous)


def test_a_diverging_member_is_reported_alone():
    xs, ys = _data(3)
    s = resolve("evaluate", {"batch": 4, "dsa": False, "threads": 1})
    _, diverged = E._train(tiny_spec(), xs, ys, 4, [0.01, 1e9, 0.01], s, SEEDS, torch.device("cpu"), lambda *a: None)
    assert diverged[0] is None and diverged[1] is not None and diverged[2] is None


def test_experts_trained_together_write_the_files_they_write_alone(tmp_path):
    common = {"num": 3, "epochs": 2, "width": 8, "depth": 2, "train_per_class": 20, "threads": 1, "device": "cpu"}
    for k in (1, 2):  # one at a time; then two together and the third alone
        experts_engine.run(ExpertSettings(**common, concurrent=k, out=tmp_path / str(k)))
    for i in range(3):
        (a, meta_a), (b, meta_b) = (load_tensors(expert_path(tmp_path / str(k), i), TRAJECTORY) for k in (1, 2))
        torch.testing.assert_close(a["trajectory"], b["trajectory"], rtol=1e-5, atol=1e-6)
        assert meta_a["seed"] == meta_b["seed"] and meta_a["test_accuracy"] == meta_b["test_accuracy"]
        assert meta_a["train_loss"] == pytest.approx(meta_b["train_loss"], rel=1e-5)
