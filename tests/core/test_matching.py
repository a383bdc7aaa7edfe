"""Trajectory matching with the DPD mask, checked against plain references in float64.

* the loss against its formula;
* rho = 0 against a naive MTT unroll, bit for bit;
* the mask against a sort-based reference (global / per layer, abs / relative);
* the low-memory meta-gradient against the full unroll;
* gradients against finite differences (torch.autograd.gradcheck).
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from dpd_cli.core.augment import dsa
from dpd_cli.core.matching import BatchGradient, MetaResult, StepPlan, matching_loss, meta_gradient
from dpd_cli.core.pruning import PruneConfig, prune_count, prune_keep_mask
from dpd_cli.models import FlatModel, build_model
from tests.helpers import assert_close, tiny_spec

DT = torch.float64


# ----------------------------------------------------------------------------------------------
# Fixtures and references


class Problem:
    """A tiny distillation problem: student net, synthetic set, expert start and target."""

    def __init__(self, n_images=6, side=8, width=4, n_classes=3, seed=0):
        torch.manual_seed(seed)
        self.fm = FlatModel(build_model(tiny_spec(1, side, n_classes, width, 2)).to(DT))
        self.images = torch.randn(n_images, 1, side, side, dtype=DT)
        self.labels = torch.arange(n_images) % n_classes
        self.start = self.fm.flatten()
        # The target: where a few real SGD steps on other data lead, plus noise so residuals vary.
        theta = self.start.clone()
        other = torch.randn(12, 1, side, side, dtype=DT)
        other_y = torch.arange(12) % n_classes
        for _ in range(3):
            t = theta.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(self.fm(t, other), other_y), t)
            theta = (t - 0.05 * g).detach()
        self.target = theta + 0.01 * torch.randn_like(theta)
        self.lr = torch.tensor(0.02, dtype=DT)
        self.sizes = [layer.numel for layer in self.fm.layers]

    def run(self, plan, prune=PruneConfig(), memory="full", images=None, lr=None) -> MetaResult:
        """meta_gradient with this iteration's (step) mask of ``prune``, as a plain DPD run builds it."""
        mask = None if prune.ratio <= 0 else (lambda e, t, s: prune_keep_mask(e, t, s, prune, self.sizes))
        return meta_gradient(
            self.fm,
            self.images if images is None else images,
            self.labels,
            self.lr if lr is None else lr,
            self.start,
            self.target,
            plan,
            memory,
            loss_mask=mask,
        )


@pytest.fixture
def prob() -> Problem:
    return Problem()


def naive_unroll(fm, x, labels, a, start, batches, seeds):
    """theta <- theta - a * grad CE, a plain loop with create_graph, written without the package."""
    theta = start.detach().requires_grad_(True)
    for idx, seed in zip(batches, seeds):
        xb = x if idx is None else x[idx]
        yb = labels if idx is None else labels[idx]
        if seed is not None:
            xb = dsa(xb, seed)
        ce = F.cross_entropy(fm(theta, xb), yb)
        (g,) = torch.autograd.grad(ce, theta, create_graph=True)
        theta = theta - a * g
    return theta


def naive_mtt(prob: Problem, batches, seeds, keep=None):
    """MTT's loss ||theta_N - target||^2 / ||start - target||^2 (masked if keep given) and its grads."""
    x = prob.images.detach().clone().requires_grad_(True)
    a = prob.lr.detach().clone().requires_grad_(True)
    end = naive_unroll(prob.fm, x, prob.labels, a, prob.start, batches, seeds)
    if keep is None:
        loss = ((end - prob.target) ** 2).sum() / ((prob.start - prob.target) ** 2).sum()
    else:
        m = keep.to(DT)
        loss = (m * (end - prob.target) ** 2).sum() / (m * (prob.start - prob.target) ** 2).sum()
    gx, ga = torch.autograd.grad(loss, [x, a])
    return loss.detach(), gx, ga, end.detach()


def reference_keep(end, target, start, ratio, scope, criterion, sizes, eps=1e-12):
    """Sort-based reference of the DPD mask: False on the ceil(ratio * n) largest residuals."""
    delta = (end - target).abs()
    if criterion == "relative":
        delta = delta / ((start - target).abs() + eps)
    keep = torch.ones(delta.numel(), dtype=torch.bool)
    groups = [(0, delta.numel())] if scope == "global" else []
    if scope == "layer":
        offset = 0
        for s in sizes:
            groups.append((offset, s))
            offset += s
    for offset, n in groups:
        k = min(n - 1, math.ceil(ratio * n - 1e-9)) if n > 1 else 0
        order = sorted(range(n), key=lambda i: -delta[offset + i].item())
        for i in order[:k]:
            keep[offset + i] = False
    return keep


def assert_rel_close(a, b, rel=1e-10):
    scale = b.abs().max().item()
    assert scale > 0
    err = (a - b).abs().max().item() / scale
    assert err <= rel, f"relative error {err:.3g} > {rel:g}"


PLAIN = StepPlan([None, None, None], [None, None, None])


def batched_plan():
    return StepPlan([torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5]), torch.tensor([5, 0, 1])], [None, None, None])


def dsa_plan():
    return StepPlan([torch.tensor([0, 1, 2, 3]), None, torch.tensor([4, 5, 0, 2])], [11, 12, 13])


# ----------------------------------------------------------------------------------------------
# The loss


def test_matching_loss_formula_by_hand():
    end = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT)
    target = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=DT)
    start = torch.tensor([2.0, 1.0, -1.0, 1.5], dtype=DT)
    # sum (end - target)^2 = 1 + 4 + 0.25 + 4 = 9.25; sum (start - target)^2 = 4 + 1 + 4 + 0.25 = 9.25
    assert matching_loss(end, target, start, None).item() == 1.0
    start2 = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=DT)  # 1 + 1 + 0 + 0 = 2
    assert matching_loss(end, target, start2, None).item() == 9.25 / 2
    keep = torch.tensor([True, False, True, False])
    # kept: (1 + 0.25) / (4 + 4) with start
    assert matching_loss(end, target, start, keep).item() == 1.25 / 8.0
    all_kept = torch.ones(4, dtype=torch.bool)
    assert matching_loss(end, target, start2, all_kept).item() == 9.25 / 2


def test_matching_loss_gradient_by_hand():
    end = torch.tensor([1.0, -2.0, 0.5], dtype=DT, requires_grad=True)
    target = torch.tensor([0.0, 0.0, 1.0], dtype=DT)
    start = torch.tensor([2.0, 1.0, -1.0], dtype=DT)
    keep = torch.tensor([True, False, True])
    (g,) = torch.autograd.grad(matching_loss(end, target, start, keep), end)
    denom = 4.0 + 4.0
    assert torch.equal(g, torch.tensor([2 * 1.0 / denom, 0.0, 2 * -0.5 / denom], dtype=DT))


# ----------------------------------------------------------------------------------------------
# prune_count and the mask


@pytest.mark.parametrize(
    "ratio,n,expected",
    [
        (0.0, 100, 0),
        (-0.1, 100, 0),
        (0.05, 255, 13),
        (0.1, 10, 1),
        (0.3, 10, 3),
        (0.01, 100, 1),
        (0.001, 10, 1),
        (0.5, 3, 2),
        (0.999, 2, 1),
        (0.9, 1, 0),
        (0.07, 100, 7),
    ],
)
def test_prune_count(ratio, n, expected):
    assert prune_count(ratio, n) == expected


def test_mask_none_when_ratio_zero(prob):
    assert prune_keep_mask(prob.start + 1, prob.target, prob.start, PruneConfig(0.0), prob.sizes) is None


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("criterion", ["abs", "relative"])
@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.3, 0.9])
def test_mask_matches_sort_reference(scope, criterion, ratio):
    g = torch.Generator().manual_seed(int(ratio * 1000) + len(scope) + len(criterion))
    sizes = [36, 4, 4, 4, 144, 4, 4, 4, 48, 3, 1]
    p = sum(sizes)
    end, target, start = (torch.randn(p, generator=g, dtype=DT) for _ in range(3))
    keep = prune_keep_mask(end, target, start, PruneConfig(ratio, scope, criterion), sizes)
    ref = reference_keep(end, target, start, ratio, scope, criterion, sizes)
    assert keep.dtype == torch.bool and keep.shape == (p,)
    assert torch.equal(keep, ref)
    if scope == "global":
        assert int((~keep).sum()) == math.ceil(ratio * p)
    else:
        offset = 0
        for s in sizes:
            expected = 0 if s == 1 else min(s - 1, math.ceil(ratio * s))
            assert int((~keep[offset : offset + s]).sum()) == expected
            offset += s


def test_mask_prunes_largest_global():
    end = torch.tensor([0.0, 5.0, 1.0, -7.0, 2.0, 0.5, 0.1, 3.0, -0.2, 0.3], dtype=DT)
    zero = torch.zeros(10, dtype=DT)
    keep = prune_keep_mask(end, zero, zero, PruneConfig(0.2), [10])
    assert (~keep).nonzero().flatten().tolist() == [1, 3]


def test_mask_layer_scope_is_per_layer():
    # Layer 0 has all the large residuals; global pruning takes them all, per-layer takes from each.
    end = torch.tensor([10.0, 20.0, 30.0, 40.0, 0.1, 0.2, 0.3, 0.4], dtype=DT)
    zero = torch.zeros(8, dtype=DT)
    g = prune_keep_mask(end, zero, zero, PruneConfig(0.25, "global"), [4, 4])
    l = prune_keep_mask(end, zero, zero, PruneConfig(0.25, "layer"), [4, 4])
    assert (~g).nonzero().flatten().tolist() == [2, 3]
    assert (~l).nonzero().flatten().tolist() == [3, 7]


def test_mask_relative_criterion():
    end = torch.tensor([2.0, 2.0, 0.5, 0.5], dtype=DT)
    target = torch.zeros(4, dtype=DT)
    start = torch.tensor([100.0, 1.0, 0.01, 1.0], dtype=DT)
    # abs: entries 0, 1 tie as largest; relative: 0.5/0.01 = 50 is by far the largest
    rel = prune_keep_mask(end, target, start, PruneConfig(0.25, criterion="relative"), [4])
    assert (~rel).nonzero().flatten().tolist() == [2]
    ab = prune_keep_mask(end, target, start, PruneConfig(0.25, criterion="abs"), [4])
    assert (~ab).nonzero().flatten().tolist() in ([0], [1])


def test_mask_ignores_autograd_history(prob):
    end = (prob.start * 1.1).requires_grad_(True)
    keep = prune_keep_mask(end * 2, prob.target, prob.start, PruneConfig(0.1), prob.sizes)
    assert not keep.requires_grad


# ----------------------------------------------------------------------------------------------
# rho = 0 is exactly MTT


@pytest.mark.parametrize("plan", [PLAIN, batched_plan()], ids=["all-images", "batches"])
def test_rho_zero_equals_naive_mtt_bit_for_bit(prob, plan):
    res = prob.run(plan)
    loss, gx, ga, _ = naive_mtt(prob, plan.batches, plan.seeds)
    assert res.keep is None
    assert torch.equal(res.loss, loss)
    assert torch.equal(res.grad_images, gx)
    assert torch.equal(res.grad_lr, ga)
    assert not res.loss.requires_grad and res.loss.dim() == 0
    assert res.grad_images.shape == prob.images.shape and res.grad_images.dtype == DT
    assert res.grad_lr.dim() == 0
    assert gx.abs().sum() > 0 and ga != 0


def test_rho_zero_with_dsa_equals_naive(prob):
    plan = dsa_plan()
    res = prob.run(plan)
    loss, gx, ga, _ = naive_mtt(prob, plan.batches, plan.seeds)
    assert torch.equal(res.loss, loss) and torch.equal(res.grad_images, gx) and torch.equal(res.grad_lr, ga)


def test_batches_only_touch_their_images(prob):
    plan = StepPlan([torch.tensor([0, 1]), torch.tensor([1, 2])], [None, None])
    res = prob.run(plan)
    assert (res.grad_images[3:] == 0).all()
    assert (res.grad_images[:3].flatten(1).abs().sum(1) > 0).all()


def test_inputs_are_not_modified(prob):
    before = [t.clone() for t in (prob.images, prob.lr, prob.start, prob.target)]
    for memory in ("full", "low"):
        prob.run(dsa_plan(), PruneConfig(0.1), memory)
    for b, t in zip(before, (prob.images, prob.lr, prob.start, prob.target)):
        assert torch.equal(b, t) and not t.requires_grad


# ----------------------------------------------------------------------------------------------
# With pruning


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("criterion", ["abs", "relative"])
def test_pruned_meta_gradient_equals_naive_with_reference_mask(prob, scope, criterion):
    plan = batched_plan()
    cfg = PruneConfig(0.1, scope, criterion)
    res = prob.run(plan, cfg)
    _, _, _, end = naive_mtt(prob, plan.batches, plan.seeds)
    ref = reference_keep(end, prob.target, prob.start, 0.1, scope, criterion, prob.sizes)
    assert torch.equal(res.keep, ref)
    loss, gx, ga, _ = naive_mtt(prob, plan.batches, plan.seeds, keep=ref)
    assert torch.equal(res.loss, loss)
    assert torch.equal(res.grad_images, gx)
    assert torch.equal(res.grad_lr, ga)
    # Pruning really changes the result.
    plain = prob.run(plan)
    assert res.loss < plain.loss
    assert not torch.allclose(res.grad_images, plain.grad_images)


def test_pruned_loss_drops_the_largest_residuals(prob):
    res = prob.run(PLAIN, PruneConfig(0.05))
    _, _, _, end = naive_mtt(prob, PLAIN.batches, PLAIN.seeds)
    delta = (end - prob.target).abs()
    k = math.ceil(0.05 * prob.fm.n_params)
    assert int((~res.keep).sum()) == k
    assert delta[~res.keep].min() >= delta[res.keep].max()


# ----------------------------------------------------------------------------------------------
# Low memory == full unroll


@pytest.mark.parametrize("plan", [PLAIN, batched_plan(), dsa_plan()], ids=["all-images", "batches", "dsa"])
@pytest.mark.parametrize(
    "prune",
    [PruneConfig(0.0), PruneConfig(0.1), PruneConfig(0.2, "layer", "relative")],
    ids=["mtt", "global", "layer-relative"],
)
def test_low_memory_equals_full(prob, plan, prune):
    full = prob.run(plan, prune, "full")
    low = prob.run(plan, prune, "low")
    assert (full.keep is None) == (low.keep is None) == (prune.ratio == 0)
    if full.keep is not None:
        assert torch.equal(full.keep, low.keep)
    assert_rel_close(low.loss, full.loss, 1e-12)
    assert_rel_close(low.grad_images, full.grad_images)
    assert_rel_close(low.grad_lr, full.grad_lr)
    assert low.grad_images.shape == full.grad_images.shape and low.grad_lr.shape == full.grad_lr.shape


def test_low_memory_long_unroll_float32():
    # The default dtype of the tool: agreement to float32 rounding over 8 steps.
    prob = Problem()
    prob.fm.module.float()
    prob.images, prob.start, prob.target, prob.lr = (t.float() for t in (prob.images, prob.start, prob.target, prob.lr))
    plan = StepPlan([None] * 8, [100 + i for i in range(8)])
    full = prob.run(plan, PruneConfig(0.05), "full")
    low = prob.run(plan, PruneConfig(0.05), "low")
    assert torch.equal(full.keep, low.keep)
    assert_close(low.grad_images, full.grad_images, rtol=1e-4, atol=1e-4 * full.grad_images.abs().max().item())
    assert_close(low.grad_lr, full.grad_lr, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("keep_graphs", [1, 2, 3, 9])
@pytest.mark.parametrize("plan", [batched_plan(), dsa_plan()], ids=["batches", "dsa"])
@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_low_memory_keeping_graphs_equals_naive(prob, plan, ratio, keep_graphs):
    # Keeping the last K steps' graphs (K >= N keeps all) changes where the work happens, not the result.
    res = meta_gradient(
        prob.fm,
        prob.images,
        prob.labels,
        prob.lr,
        prob.start,
        prob.target,
        plan,
        "low",
        loss_mask=None if ratio == 0 else (lambda e, t, s: prune_keep_mask(e, t, s, PruneConfig(ratio), prob.sizes)),
        keep_graphs=keep_graphs,
    )
    loss, gx, ga, _ = naive_mtt(prob, plan.batches, plan.seeds, keep=res.keep)
    assert (res.keep is None) == (ratio == 0)
    assert_rel_close(res.loss, loss, 1e-12)
    assert_rel_close(res.grad_images, gx)
    assert_rel_close(res.grad_lr, ga)


@pytest.mark.parametrize("keep_graphs", [0, 1, 3, 5])
def test_low_memory_recomputes_only_the_steps_it_did_not_keep(prob, keep_graphs, monkeypatch):
    # N forward passes in the forward sweep, plus one per recomputed step: N + (N - K), K capped at N; the
    # last step's graph is always kept (the backward sweep starts with it), so K = 0 recomputes N - 1.
    calls = []
    forward = type(prob.fm).__call__
    monkeypatch.setattr(type(prob.fm), "__call__", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    n = len(dsa_plan())
    meta_gradient(
        prob.fm, prob.images, prob.labels, prob.lr, prob.start, prob.target, dsa_plan(), "low", keep_graphs=keep_graphs
    )
    assert len(calls) == n + max(n - max(keep_graphs, 1), 0)


def test_keep_graphs_must_not_be_negative(prob):
    for memory in ("full", "low"):
        with pytest.raises(ValueError, match="keep_graphs"):
            meta_gradient(
                prob.fm, prob.images, prob.labels, prob.lr, prob.start, prob.target, PLAIN, memory, keep_graphs=-1
            )


# ----------------------------------------------------------------------------------------------
# Finite differences


def test_gradcheck_loss_wrt_images_two_step_unroll():
    """gradcheck of the package's unroll + loss w.r.t. the synthetic images, mask held fixed."""
    prob = Problem(n_images=4, side=6, width=2)
    plan = StepPlan([None, torch.tensor([0, 2, 3])], [7, None])
    keep = prob.run(plan, PruneConfig(0.1)).keep
    assert keep is not None and (~keep).any()
    fm, labels, a, start, target = prob.fm, prob.labels, prob.lr, prob.start, prob.target

    def loss_of(x):
        # _meta_full's logic as a function of X.
        theta = start.detach().requires_grad_(True)
        for idx, seed in zip(plan.batches, plan.seeds):
            theta = theta - a * BatchGradient()(fm, theta, x, labels, idx, seed, None, create_graph=True)
        return matching_loss(theta, target, start, keep)

    x = prob.images.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss_of, (x,), eps=1e-6, atol=1e-7, rtol=1e-4)


class _MetaLoss(torch.autograd.Function):
    """The loss with meta_gradient's own gradients, so gradcheck tests those against finite differences."""

    @staticmethod
    def forward(ctx, x, a, prob, plan, prune, memory):
        res = prob.run(plan, prune, memory, images=x, lr=a)
        ctx.save_for_backward(res.grad_images, res.grad_lr)
        return res.loss.clone()

    @staticmethod
    def backward(ctx, grad_out):
        gx, ga = ctx.saved_tensors
        return grad_out * gx, grad_out * ga, None, None, None, None


@pytest.mark.parametrize("memory", ["full", "low"])
def test_gradcheck_meta_gradient(memory):
    prob = Problem(n_images=4, side=6, width=2)
    plan = StepPlan([None, torch.tensor([1, 2, 3])], [None, 3])
    prune = PruneConfig(0.1, "layer")
    x = prob.images.clone().requires_grad_(True)
    a = prob.lr.clone().requires_grad_(True)
    # fast_mode checks u^T J v for random directions: a full-vector check at the cost of a few unrolls.
    for _ in range(3):
        assert torch.autograd.gradcheck(
            lambda x_, a_: _MetaLoss.apply(x_, a_, prob, plan, prune, memory),
            (x, a),
            eps=1e-6,
            atol=1e-8,
            rtol=1e-5,
            fast_mode=True,
        )


@pytest.mark.parametrize("memory", ["full", "low"])
@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_grad_lr_finite_difference(prob, memory, ratio):
    plan = dsa_plan()
    prune = PruneConfig(ratio)
    res = prob.run(plan, prune, memory)
    h = 1e-6
    up = prob.run(plan, prune, memory, lr=prob.lr + h).loss
    down = prob.run(plan, prune, memory, lr=prob.lr - h).loss
    fd = (up - down) / (2 * h)
    assert res.grad_lr.abs() > 1e-3
    assert_close(res.grad_lr, fd, rtol=1e-6, atol=1e-9)


def test_a_descent_step_lowers_the_loss(prob):
    # The sign of both gradients is right: a small step against them lowers the loss.
    plan = batched_plan()
    res = prob.run(plan, PruneConfig(0.05))
    step = 1e-3 / res.grad_images.abs().max()
    after = prob.run(plan, PruneConfig(0.05), images=prob.images - step * res.grad_images)
    assert after.loss < res.loss
    after_lr = prob.run(plan, PruneConfig(0.05), lr=prob.lr - 1e-4 * res.grad_lr.sign())
    assert after_lr.loss < res.loss


class _SavedBytes:
    """Bytes of the tensors that autograd graphs hold for a backward: live now, and the most at once.

    Every tensor a node saves is packed into a box; the box lives exactly as long as its graph, so
    its finaliser marks the moment the graph lets the tensor go.
    """

    class _Box:
        def __init__(self, t):
            self.t = t

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t):
        box, n = self._Box(t), t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(box, self._free, n)
        return box

    def unpack(self, box):
        return box.t

    def _free(self, n):
        self.live -= n

    def __call__(self, run):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            run()
        return self.peak


def test_low_memory_holds_one_steps_graph_at_a_time(prob):
    # Low memory's peak of saved tensors is one twice-differentiated step (the largest: DSA's draws change
    # a step's graph a little) plus the loss's parameter vector, whatever N: keeping the last step's graph
    # from the forward sweep (the backward sweep starts with it) adds nothing more. Kept graphs do add.
    seeds = list(range(50, 56))

    def low(n_steps, keep=0):
        plan = StepPlan([None] * n_steps, seeds[:n_steps])
        return lambda: meta_gradient(
            prob.fm, prob.images, prob.labels, prob.lr, prob.start, prob.target, plan, "low", keep_graphs=keep
        )

    def one_step(seed):  # written out: one step's gradient with its graph, and the products low memory takes of it
        theta = prob.start.clone().requires_grad_(True)
        x = prob.images.clone().requires_grad_(True)
        ce = F.cross_entropy(prob.fm(theta, dsa(x, seed)), prob.labels)
        (g,) = torch.autograd.grad(ce, theta, create_graph=True)
        torch.autograd.grad(g, [theta, x], grad_outputs=torch.randn_like(g))

    steps = [_SavedBytes()(lambda s=s: one_step(s)) for s in seeds]
    vector = prob.fm.n_params * prob.start.element_size()
    assert min(steps) > 50 * vector
    for n in (1, 3, 6):
        assert max(steps[:n]) <= _SavedBytes()(low(n)) <= max(steps[:n]) + vector + 8
    assert _SavedBytes()(low(6, keep=3)) >= 2.5 * min(steps)
    assert _SavedBytes()(low(6, keep=6)) >= 5.5 * min(steps)


# ----------------------------------------------------------------------------------------------
# K distillations at once (dpd distill --seeds)


def _member_plan(k: int, n_images: int) -> StepPlan:
    """Member k's own mini-batches and DSA seeds, as its run draws them."""
    g = torch.Generator().manual_seed(100 + k)
    return StepPlan([torch.randperm(n_images, generator=g)[:4] for _ in range(3)], [1000 * k + i for i in range(3)])


@pytest.mark.parametrize("memory,keep_graphs", [("full", 0), ("low", 0), ("low", 2)], ids=["full", "low", "low-keep2"])
@pytest.mark.parametrize(
    "prune",
    [PruneConfig(), PruneConfig(0.1), PruneConfig(0.1, "layer", mask="ema"), PruneConfig(0.1, mode="network")],
    ids=["mtt", "loss", "loss-ema-layer", "network"],
)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_k_members_at_once_equal_k_separate_runs(memory, keep_graphs, prune, soft):
    """Three runs with their own images, alpha, expert pair, batches, DSA draws, labels and prune state, through
    three iterations of image/alpha/label updates: one batched meta_gradient per iteration equals three
    single ones (the single-run code is the reference) to 1e-10 in float64."""
    from dpd_cli.core.matching import stack_masks
    from dpd_cli.core.pruning import Pruner

    probs = [Problem(seed=k) for k in range(3)]
    sizes = probs[0].sizes
    runs = [
        {
            "images": p.images.clone(),
            "lr": p.lr + 0.01 * k,
            "logits": torch.randn(len(p.labels), 3, generator=torch.Generator().manual_seed(k), dtype=DT)
            if soft
            else None,
        }
        for k, p in enumerate(probs)
    ]
    batch = [dict(r) for r in runs]
    single_pruners = [Pruner(prune, sizes) for _ in probs]
    batch_pruners = [Pruner(prune, sizes) for _ in probs]

    def single(k, it):
        p, r, pr = probs[k], runs[k], single_pruners[k]
        keep = pr.unroll_keep(prune.ratio)
        res = meta_gradient(
            p.fm, r["images"], p.labels, r["lr"], p.start, p.target, _member_plan(k + 10 * it, 6), memory,
            loss_mask=pr.loss_mask(prune.ratio, keep), unroll_keep=keep, label_logits=r["logits"], keep_graphs=keep_graphs,
        )  # fmt: skip
        pr.commit()
        return res

    def stacked(key):
        return None if batch[0][key] is None else torch.stack([b[key] for b in batch])

    for it in range(3):
        separate = [single(k, it) for k in range(3)]
        keeps = [pr.unroll_keep(prune.ratio) for pr in batch_pruners]
        res = meta_gradient(
            probs[0].fm,
            stacked("images"),
            torch.stack([p.labels for p in probs]),
            stacked("lr"),
            torch.stack([p.start for p in probs]),
            torch.stack([p.target for p in probs]),
            StepPlan.stack([_member_plan(k + 10 * it, 6) for k in range(3)]),
            memory,
            loss_mask=stack_masks([pr.loss_mask(prune.ratio, kp) for pr, kp in zip(batch_pruners, keeps)]),
            unroll_keep=None if keeps[0] is None else torch.stack(keeps),
            label_logits=stacked("logits"),
            keep_graphs=keep_graphs,
        )
        for pr in batch_pruners:
            pr.commit()
        assert res.loss.shape == (3,) and res.grad_lr.shape == (3,)
        for k, ref in enumerate(separate):
            got = res.member(k)
            assert (
                (got.keep is None) == (ref.keep is None) == (prune.ratio == 0 or (it == 0 and prune.mode == "network"))
            )
            if ref.keep is not None:
                assert torch.equal(got.keep, ref.keep)
            for name in ("loss", "grad_images", "grad_lr") + (("grad_labels",) if soft else ()):
                assert_rel_close(getattr(got, name), getattr(ref, name))
            # the next iteration starts from each run's own update
            for side, r in ((ref, runs[k]), (got, batch[k])):
                r["images"] = r["images"] - 50.0 * side.grad_images
                r["lr"] = r["lr"] - 1e-4 * side.grad_lr
                if soft:
                    r["logits"] = r["logits"] - 2.0 * side.grad_labels
