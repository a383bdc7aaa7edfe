"""The CUDA-graph path: static buffers, mixed DSA, the check before a graph is trusted, and (GPU) capture.

On the CPU the static computation that a graph would record runs as it is, so its equality with the
eager meta-gradient is checked here bit for bit; a CPU stand-in for the capture checks how graphs are
kept, shared and given up. The capture itself needs a GPU (tests marked ``gpu``).
"""

from __future__ import annotations

import random

import pytest
import torch

from dpd_cli.config.settings import DistillSettings
from dpd_cli.core import graphs, matching
from dpd_cli.core.pruning import PruneConfig, Pruner
from dpd_cli.models import FlatModel, build_model
from dpd_cli.recipes.distill_inputs import draw_plan
from tests.helpers import tiny_spec

N_IMAGES, N_CLASSES, STEPS = 12, 3, 4


class Problem:
    """A small float32 distillation problem on ``device`` (3 channels, so every DSA family has work to do)."""

    def __init__(self, device="cpu", seed=0, soft=False):
        torch.manual_seed(seed)
        self.fm = FlatModel(build_model(tiny_spec(3, 10, N_CLASSES, 6, 2)).to(device))
        self.images = torch.randn(N_IMAGES, 3, 10, 10, device=device)
        self.labels = torch.arange(N_IMAGES, device=device) % N_CLASSES
        self.lr = torch.tensor(0.02, device=device)
        self.sizes = [layer.numel for layer in self.fm.layers]
        self.label_logits = torch.randn(N_IMAGES, N_CLASSES, device=device) if soft else None
        self.device = device

    def expert_pair(self, it):
        g = torch.Generator().manual_seed(100 + it)
        start = self.fm.flatten() + 0.01 * torch.randn(self.fm.n_params, generator=g).to(self.device)
        return start, start + 0.02 * torch.randn(self.fm.n_params, generator=g).to(self.device)

    def plan(self, it, batch, dsa):
        s = DistillSettings(syn_steps=STEPS, batch_syn=batch, dsa=dsa)
        return draw_plan(random.Random(it), N_IMAGES, s, self.device)

    def eager(self, it, batch, dsa, memory, mask_for, ratio):
        start, target = self.expert_pair(it)
        memory, keep = _memory(memory)
        return matching.meta_gradient(
            self.fm,
            self.images,
            self.labels,
            self.lr,
            start,
            target,
            self.plan(it, batch, dsa),
            memory,
            loss_mask=mask_for(ratio),
            label_logits=self.label_logits,
            keep_graphs=keep,
        )


def _memory(name: str) -> tuple[str, int]:
    """``full``, ``low``, or ``low2`` (low memory keeping the last two steps' graphs): ``(memory, keep_graphs)``."""
    return ("low", int(name[3:])) if name.startswith("low") and name[3:] else (name, 0)


def _mask_for(cfg: PruneConfig, sizes):
    return Pruner(cfg, sizes).loss_mask


def _assert_equal(a: matching.MetaResult, b: matching.MetaResult):
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(a.grad_images, b.grad_images)
    assert torch.equal(a.grad_lr, b.grad_lr)
    assert (a.keep is None) == (b.keep is None) and (a.keep is None or torch.equal(a.keep, b.keep))
    assert (a.grad_labels is None) == (b.grad_labels is None)
    if a.grad_labels is not None:
        assert torch.equal(a.grad_labels, b.grad_labels)


CASES = [  # memory, batch, dsa, prune config, soft labels
    ("full", None, True, PruneConfig(), False),
    ("full", 5, True, PruneConfig(ratio=0.1), False),
    ("low", None, True, PruneConfig(ratio=0.1, scope="layer", criterion="layer-z"), False),
    ("low", 5, False, PruneConfig(), False),
    ("full", 5, True, PruneConfig(ratio=0.05, direction="smallest"), True),
    ("low", 5, True, PruneConfig(), True),
    ("low2", 5, True, PruneConfig(ratio=0.1), True),
]


@pytest.mark.parametrize("memory,batch,dsa,cfg,soft", CASES)
def test_static_buffers_compute_the_eager_meta_gradient_bit_for_bit(memory, batch, dsa, cfg, soft):
    """What a graph records (buffers + mixed DSA), run without a graph, is the eager iteration, bit for bit, every iteration."""
    p = Problem(soft=soft)
    mask_for = _mask_for(cfg, p.sizes)
    inputs = graphs.StaticInputs(
        p.fm.n_params, STEPS, batch if batch else None, tuple(p.images.shape), dsa, "cpu", torch.float32
    )
    for it in range(3):  # the same buffers, refilled: a stale buffer would repeat an earlier iteration
        start, target = p.expert_pair(it)
        inputs.load(start, target, p.plan(it, batch, dsa))
        mem, keep = _memory(memory)
        static = matching.meta_gradient(
            p.fm,
            p.images,
            p.labels,
            p.lr,
            inputs.start,
            inputs.target,
            inputs.plan,
            mem,
            loss_mask=mask_for(cfg.ratio),
            label_logits=p.label_logits,
            keep_graphs=keep,
        )
        _assert_equal(static, p.eager(it, batch, dsa, memory, mask_for, cfg.ratio))


def test_static_buffers_refuse_a_plan_of_another_shape():
    p = Problem()
    inputs = graphs.StaticInputs(p.fm.n_params, STEPS, 5, tuple(p.images.shape), True, "cpu", torch.float32)
    start, target = p.expert_pair(0)
    with pytest.raises(ValueError, match="buffers"):
        inputs.load(start, target, p.plan(0, None, True))  # all images, buffers hold batches of 5
    with pytest.raises(ValueError, match="buffers"):
        inputs.load(start, target, p.plan(0, 5, False))  # no DSA


class CpuCapture:
    """Stands in for ``graphs.CudaCapture``: the "graph" reruns the function into fixed output tensors on replay."""

    def __init__(self, corrupt=0.0, fail=False, eager_noise=0.0):
        self.captures, self.pools, self.corrupt, self.fail, self.eager_noise = 0, [], corrupt, fail, eager_noise
        self.warm_ups = 0
        self.noise = torch.Generator().manual_seed(7)

    def warm_up(self, fn):
        """The eager run; with ``eager_noise``, its dL/dX is off by that much (relative, random), as atomics make it on a GPU."""
        self.warm_ups += 1
        res = graphs._copy(fn())
        if self.eager_noise:
            g = res.grad_images
            jitter = torch.randn(g.shape, generator=self.noise).to(g.dtype)
            g.add_(jitter * (self.eager_noise * g.norm() / jitter.norm()))
        return res

    def capture(self, fn, pool):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        self.captures += 1
        self.pools.append(pool)
        out = fn()
        for t in (out.loss, out.grad_images, out.grad_lr, out.grad_labels):
            if t is not None:
                t.zero_()  # as after a real capture: nothing computed until the first replay
        capture = self

        class Graph:
            def replay(self):
                new = fn()
                for dst, src in zip(
                    (out.loss, out.grad_images, out.grad_lr, out.keep, out.grad_labels),
                    (new.loss, new.grad_images, new.grad_lr, new.keep, new.grad_labels),
                    strict=True,
                ):
                    if dst is not None:
                        dst.copy_(src)
                if capture.corrupt:
                    out.grad_images.mul_(1 + capture.corrupt)

            def pool(self):
                return ("pool", id(out))

        return Graph(), out


@pytest.mark.parametrize("memory", ["full", "low2"])
def test_graphs_are_captured_once_per_ratio_share_a_pool_and_replay_each_iteration(memory):
    p = Problem()
    cfg = PruneConfig(ratio=0.1)
    mask_for = _mask_for(cfg, p.sizes)
    cap = CpuCapture()
    mem, keep = _memory(memory)
    runner = graphs.GraphedMetaGradient(
        p.fm, p.images, p.labels, p.lr, mem, STEPS, 5, True, mask_for, capture=cap, keep_graphs=keep
    )
    losses = []
    for it, ratio in enumerate([0.0, 0.0, 0.1, 0.1, 0.0]):  # prune warm-up, then rho, then back
        res, note = runner(*p.expert_pair(it), p.plan(it, 5, True), ratio)
        assert note is None
        _assert_equal(res, p.eager(it, 5, True, memory, mask_for, ratio))
        losses.append((res.loss, p.eager(it, 5, True, memory, mask_for, ratio).loss))
    assert (
        cap.captures == 2 and cap.pools[0] is None and cap.pools[1] is not None
    )  # the second graph shares the first's pool
    assert all(torch.equal(kept, want) for kept, want in losses)  # each loss survived the later replays


@pytest.mark.parametrize(
    "capture,why",
    [
        (CpuCapture(corrupt=1e-4), "dL/dX differs by 1.00e-04 relative"),  # eager repeats itself: 1e-6 holds
        (CpuCapture(corrupt=1e-2, eager_noise=1e-5), "two eager runs differ by up to"),  # beyond 10x the eager spread
        (CpuCapture(fail=True), "capture failed"),
    ],
)
def test_a_graph_that_does_not_reproduce_the_eager_result_is_given_up(capture, why):
    p = Problem()
    mask_for = _mask_for(PruneConfig(), p.sizes)
    runner = graphs.GraphedMetaGradient(
        p.fm, p.images, p.labels, p.lr, "low", STEPS, None, True, mask_for, capture=capture
    )
    res, note = runner(*p.expert_pair(0), p.plan(0, None, True), 0.0)
    assert why in note and "continuing without graphs" in note
    want = p.eager(0, None, True, "low", mask_for, 0.0)
    if capture.eager_noise:  # this iteration: the (noisy) eager result
        assert graphs.close_enough(res, want, tol=2 * capture.eager_noise) is None
    else:  # this iteration: the eager result
        _assert_equal(res, want)
    assert not runner.enabled and not runner.graphs
    res, note = runner(*p.expert_pair(1), p.plan(1, None, True), 0.0)
    assert note is None
    _assert_equal(res, p.eager(1, None, True, "low", mask_for, 0.0))


def test_a_replay_within_the_eager_runs_own_spread_is_kept():
    """Eager results that do not repeat exactly (GPU atomics): the replay is held to 10x their spread, not to 1e-6."""
    p = Problem()
    mask_for = _mask_for(PruneConfig(), p.sizes)
    cap = CpuCapture(corrupt=1e-5, eager_noise=1e-5)
    runner = graphs.GraphedMetaGradient(p.fm, p.images, p.labels, p.lr, "full", STEPS, 5, True, mask_for, capture=cap)
    res, note = runner(*p.expert_pair(0), p.plan(0, 5, True), 0.0)
    assert note is None and runner.enabled and cap.warm_ups == 2  # the second eager run measured the spread
    check = runner.checks[0.0]
    assert check["replay"]["dL/dX"] == pytest.approx(2**0.5 * 1e-5, rel=0.1)  # 1e-5 off + 1e-5 of noise, independent
    assert (
        check["eager_spread"]["dL/dX"] == pytest.approx(2**0.5 * 1e-5, rel=0.1) and check["eager_spread"]["loss"] == 0
    )
    res, note = runner(*p.expert_pair(1), p.plan(1, 5, True), 0.0)  # replayed, no further eager runs
    assert note is None and cap.warm_ups == 2


def test_close_enough_with_a_spread_allows_ten_times_it_and_a_few_mask_entries():
    a = matching.MetaResult(
        torch.tensor(1.0), torch.ones(10_000), torch.tensor(2.0), torch.ones(10_000, dtype=torch.bool)
    )
    near = graphs._copy(a)
    near.grad_images[0] += 5e-3  # 5e-5 relative
    assert "dL/dX differs by" in graphs.close_enough(near, a)
    assert graphs.close_enough(near, a, spread={"loss": 0.0, "dL/dX": 1e-5, "dL/dalpha": 0.0, "mask": 0.0}) is None
    assert "allowed 4.0e-05" in graphs.close_enough(
        near, a, spread={"loss": 4e-6, "dL/dX": 0.0, "dL/dalpha": 0.0, "mask": 0.0}
    )
    masked = graphs._copy(a)
    masked.keep[:10] = False  # 1e-3 of the entries: at the slack
    assert graphs.close_enough(masked, a) == "the loss masks differ"
    assert graphs.close_enough(masked, a, spread={"loss": 1e-7, "mask": 0.0}) is None
    masked.keep[10] = False
    assert "the loss masks differ in 1.1e-03" in graphs.close_enough(masked, a, spread={"loss": 1e-7, "mask": 0.0})
    assert (
        graphs.close_enough(masked, a, spread={"loss": 1e-7, "mask": 2e-4}) is None
    )  # 10x what two eager runs differ in
    assert "dL/dX differs" in graphs.close_enough(
        near, a, spread={"loss": float("nan"), "mask": 0.0}
    )  # no allowance from NaN
    d = graphs.differences(masked, a)
    assert d == {"loss": 0.0, "dL/dX": 0.0, "dL/dalpha": 0.0, "mask": pytest.approx(11 / 10_000)}


def test_close_enough_measures_relative_difference_and_masks():
    a = matching.MetaResult(torch.tensor(1.0), torch.ones(10), torch.tensor(2.0), torch.ones(5, dtype=torch.bool))
    same = graphs._copy(a)
    assert graphs.close_enough(same, a) is None
    near = graphs._copy(a)
    near.grad_images[0] += 1e-7  # 1e-7 / sqrt(10): inside 1e-6
    assert graphs.close_enough(near, a) is None
    far = graphs._copy(a)
    far.grad_lr += 1e-5
    assert "dL/dalpha" in graphs.close_enough(far, a)
    masked = graphs._copy(a)
    masked.keep[3] = False
    assert graphs.close_enough(masked, a) == "the loss masks differ"
    nan = graphs._copy(a)
    nan.loss = torch.tensor(float("nan"))
    assert "loss" in graphs.close_enough(nan, a)


# ----------------------------------------------------------------------------------------------
# On a GPU: the real capture.


@pytest.mark.parametrize("memory", ["full", "low", "low2"])
@pytest.mark.parametrize("batch", [None, 5])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_equal_the_eager_iterations(memory, batch, soft):
    p = Problem("cuda", soft=soft)
    cfg = PruneConfig(ratio=0.05)
    mask_for = _mask_for(cfg, p.sizes)
    mem, keep = _memory(memory)
    runner = graphs.GraphedMetaGradient(
        p.fm, p.images, p.labels, p.lr, mem, STEPS, batch, True, mask_for, label_logits=p.label_logits, keep_graphs=keep
    )
    for it, ratio in enumerate([0.0, 0.05, 0.05, 0.0, 0.05]):
        res, note = runner(*p.expert_pair(it), p.plan(it, batch, True), ratio)
        assert note is None, note
        assert runner.enabled and len(runner.graphs) == (1 if it == 0 else 2)
        want = p.eager(it, batch, True, memory, mask_for, ratio)
        # DSA's grid_sample backward adds with atomics: eager does not repeat itself exactly on a GPU.
        spread = graphs.differences(p.eager(it, batch, True, memory, mask_for, ratio), want)
        assert graphs.close_enough(res, want, spread=spread) is None, (graphs.differences(res, want), spread)
        with torch.no_grad():  # the run's own in-place updates between iterations
            p.images.sub_(100 * res.grad_images)
            p.lr.sub_(1e-6 * res.grad_lr)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_makes_no_host_sync():
    p = Problem("cuda")
    mask_for = _mask_for(PruneConfig(ratio=0.05), p.sizes)
    runner = graphs.GraphedMetaGradient(p.fm, p.images, p.labels, p.lr, "full", STEPS, 5, True, mask_for)
    _, note = runner(*p.expert_pair(0), p.plan(0, 5, True), 0.05)  # capture (its check reads numbers back)
    assert note is None and runner.enabled, note
    pairs = [p.expert_pair(it) for it in (1, 2, 3)]
    plans = [p.plan(it, 5, True) for it in (1, 2, 3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for (start, target), plan in zip(pairs, plans, strict=True):
            runner(start, target, plan, 0.05)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("memory", ["full", "low", "low2"])
def test_without_dsa_and_with_deterministic_cudnn_a_replay_equals_eager_within_1e6(memory):
    """Where the eager computation repeats itself (no DSA atomics, deterministic cuDNN), the graph is held to 1e-6."""
    p = Problem("cuda")
    mask_for = _mask_for(PruneConfig(ratio=0.05), p.sizes)
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        mem, keep = _memory(memory)
        runner = graphs.GraphedMetaGradient(
            p.fm, p.images, p.labels, p.lr, mem, STEPS, 5, False, mask_for, keep_graphs=keep
        )
        for it in range(3):
            res, note = runner(*p.expert_pair(it), p.plan(it, 5, False), 0.05)
            assert note is None, note
            want = p.eager(it, 5, False, memory, mask_for, 0.05)
            assert graphs.close_enough(res, want) is None, graphs.differences(res, want)
        assert runner.checks[0.05]["eager_spread"] is None, runner.checks  # the first check needed no second eager run
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
