"""DPD's pruning choices, each against a plain reference written here (float64, loops and sorts).

* the four criteria and both directions, global and per layer;
* the EMA mask over iterations and the previous-iteration mask of network mode;
* network mode's meta-gradient (frozen parameters in the unroll) against a naive unroll, full and
  low memory, and against finite differences.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpd_cli.core.augment import dsa
from dpd_cli.core.matching import StepPlan, meta_gradient
from dpd_cli.core.pruning import CRITERIA, PruneConfig, Pruner, criterion_scores, prune_keep_mask, select_keep
from tests.core.test_matching import Problem, assert_rel_close
from tests.helpers import assert_close

DT = torch.float64
SIZES = [5, 1, 7, 3]  # odd layers, one of a single entry


def _vectors(seed=0, n=sum(SIZES)):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, generator=g, dtype=DT) for _ in range(3))  # end, target, start


def _layers(sizes):
    out, offset = [], 0
    for s in sizes:
        out.append(range(offset, offset + s))
        offset += s
    return out


def ref_scores(end, target, start, criterion, sizes, eps=1e-12):
    d = [abs(a - b) for a, b in zip(end.tolist(), target.tolist())]
    if criterion == "abs":
        return d
    if criterion == "relative":
        return [x / (abs(s - t) + eps) for x, s, t in zip(d, start.tolist(), target.tolist())]
    out = [0.0] * len(d)
    for layer in _layers(sizes):
        vals = [d[i] for i in layer]
        if criterion == "layer-z":
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
            for i in layer:
                out[i] = (d[i] - mean) / std if std > 0 else 0.0
        else:  # layer-rank: 1-based rank in ascending order, divided by the layer's size
            for r, i in enumerate(sorted(layer, key=lambda i: d[i]), start=1):
                out[i] = r / len(vals)
    return out


def ref_keep(scores, ratio, scope, direction, sizes):
    keep = [True] * len(scores)
    groups = [range(len(scores))] if scope == "global" else _layers(sizes)
    for group in groups:
        n = len(group)
        k = min(n - 1, math.ceil(ratio * n - 1e-9)) if n > 1 else 0
        order = sorted(group, key=lambda i: scores[i], reverse=(direction == "largest"))
        for i in order[:k]:
            keep[i] = False
    return torch.tensor(keep)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_criterion_scores_match_reference(criterion):
    end, target, start = _vectors()
    got = criterion_scores(end, target, start, criterion, SIZES)
    assert_close(got, torch.tensor(ref_scores(end, target, start, criterion, SIZES), dtype=DT), rtol=1e-12, atol=1e-12)


def test_layer_criteria_are_scale_free():
    """Multiplying one layer's residuals by 1000 moves abs scores, not the layer-wise ones."""
    end, target, start = _vectors(1)
    scaled_end = end.clone()
    scaled_end[:5] = target[:5] + 1000 * (end[:5] - target[:5])
    for criterion in ("layer-z", "layer-rank"):
        assert_close(
            criterion_scores(scaled_end, target, start, criterion, SIZES),
            criterion_scores(end, target, start, criterion, SIZES),
            rtol=1e-9,
            atol=1e-12,
        )
    assert not torch.allclose(
        criterion_scores(scaled_end, target, start, "abs", SIZES), criterion_scores(end, target, start, "abs", SIZES)
    )


def test_layer_z_of_a_constant_layer_is_zero():
    end = torch.tensor([1.0, 1.0, 1.0, 2.0, 5.0], dtype=DT)
    z = criterion_scores(end, torch.zeros(5, dtype=DT), torch.zeros(5, dtype=DT), "layer-z", [3, 2])
    assert torch.equal(z[:3], torch.zeros(3, dtype=DT)) and torch.isfinite(z).all()


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("direction", ["largest", "smallest"])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_selection_matches_sort_reference(criterion, scope, direction, ratio):
    end, target, start = _vectors(2)
    scores = criterion_scores(end, target, start, criterion, SIZES)
    got = select_keep(scores, ratio, scope, direction, SIZES)
    # Distinct scores (no ties) so the reference's order is the only right answer.
    assert len(set(scores.tolist())) == len(scores) or criterion == "layer-rank"
    ref = ref_keep(ref_scores(end, target, start, criterion, SIZES), ratio, scope, direction, SIZES)
    if criterion == "layer-rank" and scope == "global":  # ranks tie across layers: compare counts per value
        assert int((~got).sum()) == int((~ref).sum())
        pruned_vals = sorted(scores[~got].tolist())
        assert pruned_vals == sorted(
            torch.tensor(ref_scores(end, target, start, criterion, SIZES), dtype=DT)[~ref].tolist()
        )
    else:
        assert torch.equal(got, ref)


def test_smallest_prunes_the_best_aligned():
    d = torch.tensor([5.0, 1.0, 3.0, 0.5, 2.0], dtype=DT)
    zero = torch.zeros(5, dtype=DT)
    keep = select_keep(criterion_scores(d, zero, zero, "abs", [5]), 0.4, "global", "smallest", [5])
    assert keep.tolist() == [True, False, True, False, True]


def test_ratio_zero_prunes_nothing_and_keeps_no_state():
    pruner = Pruner(PruneConfig(0.0, mask="ema", mode="network"), SIZES)
    assert pruner.loss_mask(0.0) is None and pruner.unroll_keep(0.0) is None
    pruner.commit()
    assert pruner.state is None


# ----------------------------------------------------------------------------------------------
# Masks over iterations


def _iterations(n=6):
    return [_vectors(10 + i) for i in range(n)]


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_ema_mask_follows_a_naive_average(beta):
    cfg = PruneConfig(0.25, "global", "abs", "largest", mask="ema", ema_beta=beta)
    pruner = Pruner(cfg, SIZES)
    ema = None
    for end, target, start in _iterations():
        keep = pruner.loss_mask(0.25)(end, target, start)
        pruner.commit()
        score = ref_scores(end, target, start, "abs", SIZES)
        ema = score if ema is None else [beta * e + (1 - beta) * s for e, s in zip(ema, score)]
        assert torch.equal(keep, ref_keep(ema, 0.25, "global", "largest", SIZES))
        assert_close(pruner.state, torch.tensor(ema, dtype=DT), rtol=1e-12, atol=1e-12)


def test_ema_differs_from_step_after_the_first_iteration():
    step, ema = Pruner(PruneConfig(0.25), SIZES), Pruner(PruneConfig(0.25, mask="ema", ema_beta=0.9), SIZES)
    masks = []
    for end, target, start in _iterations():
        masks.append((step.loss_mask(0.25)(end, target, start), ema.loss_mask(0.25)(end, target, start)))
        step.commit()
        ema.commit()
    assert torch.equal(*masks[0])  # the EMA starts at the first score
    assert any(not torch.equal(a, b) for a, b in masks[1:])
    assert step.state is None  # plain step pruning carries nothing across iterations


@pytest.mark.parametrize("mask", ["step", "ema"])
def test_network_mode_mask_comes_from_before_the_iteration(mask):
    cfg = PruneConfig(0.25, "layer", "layer-z", "largest", mask=mask, ema_beta=0.5, mode="network")
    pruner = Pruner(cfg, SIZES)
    previous = ema = None
    for i, (end, target, start) in enumerate(_iterations()):
        unroll = pruner.unroll_keep(0.25)
        if i == 0:
            assert unroll is None  # the first iteration prunes nothing
        else:
            source = previous if mask == "step" else ema
            assert torch.equal(unroll, ref_keep(source, 0.25, "layer", "largest", SIZES))
        # The loss leaves out exactly the frozen parameters.
        assert pruner.loss_mask(0.25, unroll)(end, target, start) is unroll
        pruner.commit()
        score = ref_scores(end, target, start, "layer-z", SIZES)
        previous = score
        ema = score if ema is None else [0.5 * e + 0.5 * s for e, s in zip(ema, score)]


def test_state_round_trip_resumes_the_same_masks():
    cfg = PruneConfig(0.25, mask="ema", ema_beta=0.8, mode="network")
    a = Pruner(cfg, SIZES)
    its = _iterations()
    for end, target, start in its[:3]:
        a.loss_mask(0.25, a.unroll_keep(0.25))(end, target, start)
        a.commit()
    b = Pruner(cfg, SIZES, state=a.state.clone())
    for end, target, start in its[3:]:
        ka, kb = a.unroll_keep(0.25), b.unroll_keep(0.25)
        assert torch.equal(ka, kb)
        a.loss_mask(0.25, ka)(end, target, start)
        b.loss_mask(0.25, kb)(end, target, start)
        a.commit()
        b.commit()


# ----------------------------------------------------------------------------------------------
# Network mode: frozen parameters in the unroll


def naive_frozen_unroll(prob, x, a, u, batches, seeds):
    """theta <- theta - a * u * grad CE: u = 0 holds a parameter at its start value. Written without the package."""
    theta = prob.start.detach().requires_grad_(True)
    for idx, seed in zip(batches, seeds):
        xb = x if idx is None else x[idx]
        yb = prob.labels if idx is None else prob.labels[idx]
        if seed is not None:
            xb = dsa(xb, seed)
        (g,) = torch.autograd.grad(F.cross_entropy(prob.fm(theta, xb), yb), theta, create_graph=True)
        theta = theta - a * u * g
    return theta


def _network_reference(prob, plan, keep):
    x = prob.images.detach().clone().requires_grad_(True)
    a = prob.lr.detach().clone().requires_grad_(True)
    u = keep.to(DT)
    end = naive_frozen_unroll(prob, x, a, u, plan.batches, plan.seeds)
    loss = (u * (end - prob.target) ** 2).sum() / (u * (prob.start - prob.target) ** 2).sum()
    gx, ga = torch.autograd.grad(loss, [x, a])
    return loss.detach(), gx, ga, end.detach()


def _frozen(prob, ratio=0.3, seed=5):
    """A mask as network mode would bring from an earlier iteration: here, random scores."""
    g = torch.Generator().manual_seed(seed)
    return select_keep(torch.rand(prob.fm.n_params, generator=g, dtype=DT), ratio, "global", "largest", prob.sizes)


PLANS = {
    "all-images": StepPlan([None, None, None], [None, None, None]),
    "batches-dsa": StepPlan([torch.tensor([0, 1, 2, 3]), None, torch.tensor([4, 5, 0, 2])], [11, 12, 13]),
}


# low memory recomputing every step, and keeping the last two steps' graphs
MEMORIES = {"full": ("full", 0), "low": ("low", 0), "low-keep2": ("low", 2)}


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
@pytest.mark.parametrize("memory", MEMORIES.values(), ids=MEMORIES.keys())
def test_network_mode_equals_naive_frozen_unroll(plan, memory):
    prob = Problem()
    keep = _frozen(prob)
    memory, kept = memory
    res = meta_gradient(
        prob.fm,
        prob.images,
        prob.labels,
        prob.lr,
        prob.start,
        prob.target,
        plan,
        memory,
        loss_mask=lambda e, t, s: keep,
        unroll_keep=keep,
        keep_graphs=kept,
    )
    loss, gx, ga, end = _network_reference(prob, plan, keep)
    # The frozen parameters really did not move.
    assert torch.equal(end[~keep], prob.start[~keep]) and not torch.equal(end[keep], prob.start[keep])
    assert_rel_close(res.loss, loss, 1e-12)
    assert_rel_close(res.grad_images, gx, 1e-10)
    assert_rel_close(res.grad_lr, ga, 1e-10)
    # And it is not the loss-only mask's result.
    loss_only = meta_gradient(
        prob.fm,
        prob.images,
        prob.labels,
        prob.lr,
        prob.start,
        prob.target,
        plan,
        memory,
        loss_mask=lambda e, t, s: keep,
    )
    assert not torch.allclose(loss_only.grad_images, res.grad_images)


@pytest.mark.parametrize("memory", ["full", "low"])
def test_network_mode_gradient_finite_differences(memory):
    prob = Problem(n_images=4, side=6, width=2)
    plan = StepPlan([None, torch.tensor([1, 2, 3])], [None, 3])
    keep = _frozen(prob, 0.25, seed=2)

    def loss_at(x, a):
        return meta_gradient(
            prob.fm,
            x,
            prob.labels,
            a,
            prob.start,
            prob.target,
            plan,
            memory,
            loss_mask=lambda e, t, s: keep,
            unroll_keep=keep,
        )

    res = loss_at(prob.images, prob.lr)
    h = 1e-6
    fd_a = (loss_at(prob.images, prob.lr + h).loss - loss_at(prob.images, prob.lr - h).loss) / (2 * h)
    assert_close(res.grad_lr, fd_a, rtol=1e-6, atol=1e-10)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(prob.images.shape, generator=g, dtype=DT)
    fd_v = (loss_at(prob.images + h * v, prob.lr).loss - loss_at(prob.images - h * v, prob.lr).loss) / (2 * h)
    assert_close((res.grad_images * v).sum(), fd_v, rtol=1e-6, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Soft labels (DATM): the student trains on softmax(Y); dL/dY by the same meta-gradient


def _soft_problem():
    prob = Problem()
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(len(prob.labels), 3, generator=g, dtype=DT) + 3 * F.one_hot(prob.labels, 3).to(DT)
    return prob, logits


def naive_soft(prob, logits, plan, keep=None):
    """The unroll on soft targets, written out: CE = -sum_c softmax(Y)_c log softmax(f)_c, mean over the batch."""
    x = prob.images.detach().clone().requires_grad_(True)
    a = prob.lr.detach().clone().requires_grad_(True)
    y = logits.detach().clone().requires_grad_(True)
    theta = prob.start.detach().requires_grad_(True)
    for idx, seed in zip(plan.batches, plan.seeds):
        xb = x if idx is None else x[idx]
        pb = torch.softmax(y, dim=1) if idx is None else torch.softmax(y, dim=1)[idx]
        if seed is not None:
            xb = dsa(xb, seed)
        ce = -(pb * torch.log_softmax(prob.fm(theta, xb), dim=1)).sum(1).mean()
        (gr,) = torch.autograd.grad(ce, theta, create_graph=True)
        theta = theta - a * gr
    m = torch.ones_like(theta) if keep is None else keep.to(DT)
    loss = (m * (theta - prob.target) ** 2).sum() / (m * (prob.start - prob.target) ** 2).sum()
    return (loss.detach(), *torch.autograd.grad(loss, [x, a, y]))


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
@pytest.mark.parametrize("memory", MEMORIES.values(), ids=MEMORIES.keys())
def test_soft_labels_meta_gradient_equals_naive(plan, memory):
    prob, logits = _soft_problem()
    cfg = PruneConfig(0.1)
    mask = lambda e, t, s: prune_keep_mask(e, t, s, cfg, prob.sizes)  # noqa: E731
    memory, kept = memory
    res = meta_gradient(
        prob.fm,
        prob.images,
        prob.labels,
        prob.lr,
        prob.start,
        prob.target,
        plan,
        memory,
        loss_mask=mask,
        label_logits=logits,
        keep_graphs=kept,
    )
    loss, gx, ga, gy = naive_soft(prob, logits, plan, res.keep)
    assert_rel_close(res.loss, loss, 1e-12)
    assert_rel_close(res.grad_images, gx, 1e-10)
    assert_rel_close(res.grad_lr, ga, 1e-10)
    assert_rel_close(res.grad_labels, gy, 1e-10)
    assert res.grad_labels.shape == logits.shape and res.grad_labels.abs().max() > 0
    hard = meta_gradient(
        prob.fm, prob.images, prob.labels, prob.lr, prob.start, prob.target, plan, memory, loss_mask=mask
    )
    assert hard.grad_labels is None and not torch.allclose(hard.grad_images, res.grad_images)


def test_soft_label_gradient_finite_differences():
    prob, logits = _soft_problem()
    plan = PLANS["batches-dsa"]
    loss = lambda y: meta_gradient(
        prob.fm,
        prob.images,
        prob.labels,
        prob.lr,
        prob.start,
        prob.target,
        plan,  # noqa: E731
        "low",
        label_logits=y,
    )
    res = loss(logits)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(logits.shape, generator=g, dtype=DT)
    h = 1e-6
    fd = (loss(logits + h * v).loss - loss(logits - h * v).loss) / (2 * h)
    assert_close((res.grad_labels * v).sum(), fd, rtol=1e-6, atol=1e-10)
