"""One distillation meta-gradient captured as a CUDA graph and replayed (``--cuda-graphs``, on by default on CUDA).

At IPC 10 a GPU iteration is bound by the host issuing tens of thousands of small kernels; a CUDA
graph records them once and replays them with one launch. A graph replays fixed kernels on fixed
memory, so everything that changes from one iteration to the next lives in buffers allocated once
(``StaticInputs``) and is written before each replay, outside the graph:

* theta*_t and theta*_{t+M} (the expert rows of this iteration);
* the mini-batch indices of every step (the engine's own permutations, copied in);
* the DSA numbers of every step: ``augment.dsa_draw_all`` draws every family's numbers from the
  step's seed (the chosen family's are exactly what ``dsa`` draws) with a one-hot weight on the
  chosen family; inside the graph ``augment.dsa_mixed`` applies all six families and keeps the one
  with weight 1, so the kernel sequence does not depend on the seed.

The images, labels (or label logits) and alpha are the run's own tensors, updated in place. With
one-hot weights the graph computes exactly the eager meta-gradient (``test_graphs``: bit for bit on
the CPU, where the same static computation runs without a graph). Each graph is checked once against
an eager computation of the same iteration before it is used. On a GPU the eager computation does
not repeat itself exactly: DSA's ``grid_sample`` backward and some cuDNN convolution algorithms add
with atomics, in whatever order threads finish. So when the replay is not within 1e-6 (relative, in
norm) of the eager result, a second eager run measures that spread, and the replay may differ by up
to ``SPREAD_FACTOR`` times it. Anything further turns graphs off for the run, with a message, and the
eager result is used.

One graph per prune ratio in use (0 during ``--prune-warmup``, then rho), sharing one memory pool.
Not used (the eager path runs): off CUDA, under torchrun, and with prune settings that carry state
across iterations (``--prune-mask ema``, ``--prune-mode network``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import replace

import torch

from dpd_cli.core import matching
from dpd_cli.core.augment import OPS, dsa_draw_all

__all__ = ["StaticInputs", "GraphedMetaGradient", "CudaCapture", "close_enough", "differences"]

#: Largest relative difference (in norm) between a replay and the eager computation it replaces, when
#: the eager computation repeats itself exactly.
TOLERANCE = 1e-6
#: When two eager runs differ: how many times their largest relative difference a replay may differ by.
SPREAD_FACTOR = 10.0
#: ... and the fraction of loss-mask entries (rho > 0) that may differ: parameters at the prune
#: threshold fall on either side of it when the residuals move in their last digits.
MASK_SLACK = 1e-3


class StaticInputs:
    """The per-iteration inputs of one meta-gradient, in buffers allocated once: P parameters, N steps of
    ``batch`` images each (``None``: all of the synthetic set, ``image_shape`` ``(n_images, C, H, W)``)."""

    def __init__(self, n_params: int, n_steps: int, batch: int | None, image_shape, dsa: bool, device, dtype):
        self.start = torch.zeros(n_params, device=device, dtype=dtype)
        self.target = torch.zeros(n_params, device=device, dtype=dtype)
        self.index = None if batch is None else torch.zeros((n_steps, batch), dtype=torch.long, device=device)
        self.n_steps, self.dsa = n_steps, dsa
        n = image_shape[0] if batch is None else batch
        self._probe = torch.zeros((n, *image_shape[1:]), device=device, dtype=dtype)
        self.weights = self.params = mixes = None
        if dsa:
            self.weights = torch.zeros((n_steps, len(OPS)), device=device, dtype=dtype)
            # Per family, per number it draws: (N, *shape of that number for a batch of n).
            self.params = [
                tuple(torch.zeros((n_steps, *t.shape), device=device, dtype=t.dtype) for t in fam)
                for fam in dsa_draw_all(self._probe, 0)[1]
            ]
            mixes = [(self.weights[k], [tuple(t[k] for t in fam) for fam in self.params]) for k in range(n_steps)]
        batches = [None if self.index is None else self.index[k] for k in range(n_steps)]
        self.plan = matching.StepPlan(batches, [None] * n_steps, mixes)

    def load(self, start: torch.Tensor, target: torch.Tensor, plan: matching.StepPlan) -> None:
        """Write one iteration's expert rows, batches and DSA numbers into the buffers (kernels, no host sync)."""
        if len(plan) != self.n_steps:
            raise ValueError(f"plan has {len(plan)} steps, the buffers {self.n_steps}")
        self.start.copy_(start)
        self.target.copy_(target)
        for k, (idx, seed) in enumerate(zip(plan.batches, plan.seeds, strict=True)):
            if (idx is None) != (self.index is None) or (seed is None) == self.dsa:
                raise ValueError("plan does not match the buffers (batches or DSA)")
            if idx is not None:
                self.index[k].copy_(idx)
            if seed is not None:
                weights, drawn = dsa_draw_all(self._probe, seed)
                self.weights[k].copy_(weights)
                for bufs, fam in zip(self.params, drawn, strict=True):
                    for buf, t in zip(bufs, fam, strict=True):
                        buf[k].copy_(t)


def differences(a: matching.MetaResult, b: matching.MetaResult) -> dict[str, float]:
    """How far ``a`` is from ``b``: each output's relative difference in norm, and the fraction of mask entries that differ.

    Keys: ``loss``, ``dL/dX``, ``dL/dalpha``, ``dL/dlabels`` (when either has label gradients) and
    ``mask`` (0 when neither has a mask, 1 when only one has). An output missing on one side is ``inf``.
    Reads the numbers back to the host (a synchronisation): for checks, not for every iteration.
    """
    pairs = [("loss", a.loss, b.loss), ("dL/dX", a.grad_images, b.grad_images), ("dL/dalpha", a.grad_lr, b.grad_lr)]
    if a.grad_labels is not None or b.grad_labels is not None:
        pairs.append(("dL/dlabels", a.grad_labels, b.grad_labels))
    out = {}
    for name, x, y in pairs:
        if x is None or y is None:
            out[name] = math.inf
        else:
            diff = float((x.double() - y.double()).norm())
            out[name] = diff / max(float(y.double().norm()), torch.finfo(y.dtype).tiny)
    if a.keep is None or b.keep is None:
        out["mask"] = 0.0 if a.keep is None and b.keep is None else 1.0
    else:
        out["mask"] = float((a.keep != b.keep).sum()) / max(a.keep.numel(), 1)
    return out


def close_enough(
    a: matching.MetaResult, b: matching.MetaResult, tol: float = TOLERANCE, spread: dict[str, float] | None = None
) -> str | None:
    """``None`` when ``a`` agrees with ``b``; else what differs.

    Agreement: every output within ``tol`` (relative, in norm) and equal masks. ``spread`` is
    ``differences(b2, b)`` for a second run ``b2`` of the computation that gave ``b``: when those
    differ, ``a`` may differ from ``b`` by up to ``SPREAD_FACTOR`` times their largest relative
    difference, and its mask in up to ``MASK_SLACK`` of the entries (or ``SPREAD_FACTOR`` times the
    fraction theirs differ in, if larger).
    """
    allowed, mask_allowed, why = tol, 0.0, ""
    noise = max((v for k, v in (spread or {}).items() if k != "mask"), default=0.0)
    if math.isfinite(noise) and noise > 0:
        allowed = max(tol, SPREAD_FACTOR * noise)
        mask_allowed = max(MASK_SLACK, SPREAD_FACTOR * spread.get("mask", 0.0))
        why = f" (two eager runs differ by up to {noise:.1e}; allowed {allowed:.1e})"
    d = differences(a, b)
    for name, rel in d.items():
        if name != "mask" and not rel <= allowed:
            return f"{name} differs by {rel:.2e} relative{why}"
    if not d["mask"] <= mask_allowed:
        return "the loss masks differ" + (f" in {d['mask']:.1e} of the entries{why}" if why else "")
    return None


class CudaCapture:
    """How ``GraphedMetaGradient`` warms up and captures on a GPU (tests substitute a CPU stand-in)."""

    def __init__(self, device: torch.device):
        self.device = device

    def warm_up(self, fn: Callable[[], matching.MetaResult]) -> matching.MetaResult:
        """Run ``fn`` once on a side stream (lazy initialisation must not happen during capture); its result, copied."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            res = _copy(fn())
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.empty_cache()  # hand the eager run's blocks back before the graph takes its own pool
        return res

    def capture(self, fn: Callable[[], matching.MetaResult], pool) -> tuple[object, matching.MetaResult]:
        """Record ``fn`` into a new graph (in ``pool``, shared with the run's other graph, if any)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        return graph, out


class GraphedMetaGradient:
    """``matching.meta_gradient`` for one run's fixed shapes, replayed from a CUDA graph.

    Example (what ``engine.distill`` does every iteration)::

        graphed = GraphedMetaGradient(fm, images, labels, lr, memory, n_steps, batch, dsa, pruner.loss_mask)
        res, note = graphed(start, target, plan, ratio)   # note: why graphs were just turned off, or None

    ``images``, ``labels``, ``lr`` (and ``label_logits``) must be updated in place between calls.
    The returned tensors (except the loss, which is a copy) are the graph's outputs: use them before
    the next call.

    Args:
        mask_for: ``ratio -> loss-mask function`` (``Pruner.loss_mask``; stateless settings only).
        keep_graphs: ``meta_gradient``'s, with ``memory="low"``.
        capture: Warms up and captures (``CudaCapture`` on the images' device by default).
    """

    def __init__(
        self,
        fm,
        images,
        labels,
        lr,
        memory: str,
        n_steps: int,
        batch: int | None,
        dsa: bool,
        mask_for: Callable[[float], matching.MaskFn | None],
        label_logits: torch.Tensor | None = None,
        capture=None,
        keep_graphs: int = 0,
    ):
        # meta_gradient with everything but the expert rows, the plan and the loss mask bound.
        self._meta = functools.partial(
            matching.meta_gradient,
            fm,
            images,
            labels,
            lr,
            memory=memory,
            label_logits=label_logits,
            keep_graphs=keep_graphs,
        )
        self.images, self.lr, self.mask_for = images, lr, mask_for
        self.capture = capture or CudaCapture(images.device)
        self.inputs = StaticInputs(fm.n_params, n_steps, batch, tuple(images.shape), dsa, images.device, images.dtype)
        #: Per ratio, ``(graph, its outputs)``: a torch.cuda.CUDAGraph (or a test stand-in with replay() and pool()).
        self.graphs: dict[float, tuple[object, matching.MetaResult]] = {}
        self.enabled = True
        #: Per ratio, the check made before its graph was trusted: ``differences`` of the first replay
        #: from the eager result, and of a second eager run from the first (``None`` if not needed).
        self.checks: dict[float, dict] = {}

    def _compute(self, ratio: float) -> matching.MetaResult:
        i = self.inputs
        return self._meta(start=i.start, target=i.target, plan=i.plan, loss_mask=self.mask_for(ratio))

    def __call__(self, start, target, plan: matching.StepPlan, ratio: float) -> tuple[matching.MetaResult, str | None]:
        """This iteration's meta-gradient, and a note when graphs were just turned off (else ``None``)."""
        self.inputs.load(start, target, plan)
        if not self.enabled:
            return self._compute(ratio), None
        if ratio in self.graphs:
            graph, out = self.graphs[ratio]
            graph.replay()
            return replace(out, loss=out.loss.clone()), None
        # First use of this ratio: the warm-up is the eager result; the graph is used once its replay equals it.
        fn = lambda: self._compute(ratio)  # noqa: E731
        eager = self.capture.warm_up(fn)
        pool = next(iter(self.graphs.values()))[0].pool() if self.graphs else None
        try:
            graph, out = self.capture.capture(fn, pool)
            graph.replay()
        except RuntimeError as e:  # capture refused (driver, an operation that cannot be captured)
            self.enabled, self.graphs = False, {}
            return eager, f"CUDA graph capture failed ({str(e).splitlines()[0][:200]}); continuing without graphs."
        check = {"replay": differences(out, eager), "eager_spread": None}
        why = close_enough(out, eager)
        if why is not None:  # nondeterministic kernels? A second eager run says how far eager is from itself.
            check["eager_spread"] = differences(self.capture.warm_up(fn), eager)
            why = close_enough(out, eager, spread=check["eager_spread"])
        self.checks[ratio] = check
        if why is not None:
            self.enabled, self.graphs = False, {}
            return (
                eager,
                f"The CUDA graph's first replay differs from the eager computation ({why}); continuing without graphs.",
            )
        self.graphs[ratio] = graph, out
        return replace(out, loss=out.loss.clone()), None


def _copy(res: matching.MetaResult) -> matching.MetaResult:
    return matching.MetaResult(*(None if t is None else t.clone() for t in vars(res).values()))
