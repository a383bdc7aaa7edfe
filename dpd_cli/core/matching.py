"""Trajectory matching: the student unroll, the (masked) loss and the meta-gradient.

Notation (docs/algorithm.md): a student starts at the expert's epoch-t parameters ``start`` =
theta*_t and takes N SGD steps on the synthetic images X with learnable step size alpha::

    theta_{n+1} = theta_n - alpha * u * grad_theta CE(f(DSA(X_{b_n}); theta_n), Y_{b_n})

where u is 1 everywhere, or in DPD's ``network`` mode 0 on the parameters frozen at theta*_t
(``unroll_keep``). The loss against the target theta*_{t+M} keeps the parameters of the mask m
(``loss_mask``; which parameters is ``dpd_cli.core.pruning``'s business)::

    L = sum(m * (theta_N - target)^2) / sum(m * (start - target)^2)

With no mask this is exactly MTT's loss (no mask is built or multiplied in).

Two ways to get dL/dX and dL/dalpha, equal up to rounding:

* ``full``: keep all N steps' double-backward graph alive and call autograd once (MTT).
* ``low``: keep only the N+1 flat parameter vectors (one preallocated (N+1, P) buffer); walk
  backwards recomputing one step's graph at a time. With lambda = dL/dtheta_{n+1},
  mu = u * lambda and g_n = grad_theta CE at step n:
      dL/dalpha += -<mu, g_n>
      dL/dX     += -alpha * (d g_n / dX)^T mu          (vector-Jacobian product)
      lambda    <- lambda - alpha * (d g_n / d theta_n)^T mu   (vector-Hessian product)
  Peak memory is one step's graph plus the buffer, flat in N. This is exact, not TESLA's
  approximation.

  The last step's graph is built in the forward sweep and kept: the backward sweep starts with
  it, so it is the one step's graph of the peak, and recomputing it would only cost time.
  ``keep_graphs`` K trades memory back for time: the forward sweep builds the last K steps'
  graphs (with create_graph) and keeps them, so the backward sweep recomputes only the first
  N - K steps. Peak memory is about K steps' graphs plus the buffer; K = 0 and K = 1 are plain
  ``low``, and K = N does the work of ``full`` (each step's graph kept on its own instead of one chain).

K independent distillations at once (``dpd distill --seeds``): every per-run quantity gains a leading
member axis -- theta ``(K, P)``, X ``(K, n, C, H, W)``, alpha ``(K,)``, masks ``(K, P)``, a ``StepPlan.stack``
of the K plans -- and the same code runs them: member k's inner gradient is that of the SUM of the K
cross-entropies (the other members' do not depend on theta_k), its loss is its own (the loss is ``(K,)``,
autograd differentiates its sum), and ``FlatModel`` runs the K students as one wide network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpd_cli.core.augment import dsa, dsa_mixed
from dpd_cli.models import FlatModel

__all__ = ["StepPlan", "MaskFn", "matching_loss", "meta_gradient", "MetaResult", "stack_masks"]

#: ``(theta_N, target, start) -> keep`` (bool (P,), False = left out of the loss) or ``None`` (keep all).
MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@dataclass
class StepPlan:
    """The randomness of one unroll, so that it can be replayed exactly."""

    batches: list[torch.Tensor | None]  # per step, indices into the synthetic set, or None for all images
    seeds: list[int | None]  # per step, the DSA seed, or None for no augmentation
    #: Per step, ``(weights, params)`` for ``dsa_mixed`` instead of a seed (the CUDA-graph path,
    #: ``dpd_cli.core.graphs``: numbers drawn outside the graph, applied inside it).
    mixes: list[tuple] | None = None

    def __len__(self) -> int:
        return len(self.seeds)

    def steps(self):
        """``(batch, seed, mix)`` per step."""
        return zip(self.batches, self.seeds, self.mixes or [None] * len(self.seeds), strict=True)

    @classmethod
    def stack(cls, plans: list[StepPlan]) -> StepPlan:
        """K members' plans as one: per step the batches ``(K, b)`` (or ``None``) and a tuple of K seeds."""
        steps = list(zip(*(zip(p.batches, p.seeds, strict=True) for p in plans), strict=True))
        batches = [None if step[0][0] is None else torch.stack([b for b, _ in step]) for step in steps]
        return cls(batches, [None if step[0][1] is None else tuple(sd for _, sd in step) for step in steps])


@dataclass
class MetaResult:
    loss: torch.Tensor  # () detached; (K,) for K members
    grad_images: torch.Tensor  # like X
    grad_lr: torch.Tensor  # () like alpha
    keep: torch.Tensor | None  # (P,) bool loss mask, False = pruned; None when nothing is pruned
    grad_labels: torch.Tensor | None = None  # like the label logits, with soft labels

    def member(self, k: int) -> MetaResult:
        """Member k's result, of K computed at once."""
        return MetaResult(*(None if t is None else t[k] for t in vars(self).values()))


def matching_loss(
    student_end: torch.Tensor, target: torch.Tensor, start: torch.Tensor, keep: torch.Tensor | None
) -> torch.Tensor:
    """Normalised parameter-matching loss; with ``keep=None`` exactly MTT's sum/sum (per member: ``(K,)``)."""
    if keep is None:
        return ((student_end - target) ** 2).sum(-1) / ((start - target) ** 2).sum(-1)
    m = keep.to(student_end.dtype)
    return (m * (student_end - target) ** 2).sum(-1) / (m * (start - target) ** 2).sum(-1)


def stack_masks(fns: list[MaskFn | None]) -> MaskFn | None:
    """K members' loss-mask functions as one over ``(K, P)`` rows (a member without a mask keeps everything)."""
    if all(f is None for f in fns):
        return None

    def mask(ends, targets, starts):
        keeps = [None if f is None else f(e, t, s) for f, e, t, s in zip(fns, ends, targets, starts, strict=True)]
        if all(k is None for k in keeps):
            return None
        return torch.stack([torch.ones_like(e, dtype=torch.bool) if k is None else k for k, e in zip(keeps, ends)])

    return mask


def _per(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha against ``t``: the scalar itself, or the K members' ``(K,)`` along ``t``'s leading member axis."""
    return a if a.dim() == 0 else a.view(-1, *[1] * (t.dim() - 1))


class BatchGradient:
    """grad_theta CE(f(DSA(X_b); theta), Y_b), the mean over the mini-batch b, on one process.

    ``labels`` are class indices ``(n,)``, or class probabilities ``(n, C)`` (soft labels: the
    cross-entropy is then -sum_c p_c log softmax(f)_c, as DATM's). ``reduce`` combines what each
    process computed of a result into the whole: nothing to do on one process.
    ``dpd_cli.core.parallel.ShardedGradient`` is the same over several processes.

    K members (theta ``(K, P)``, ``idx`` ``(K, b)``, ``seed`` a tuple of K): each member's rows and DSA draw as
    its own run's, and the gradient of the sum of the members' mean cross-entropies, ``(K, P)``.
    """

    def __call__(self, fm: FlatModel, theta, images, labels, idx, seed, mix, create_graph: bool) -> torch.Tensor:
        members = theta.dim() == 2
        x, y = images, labels
        if idx is not None:
            at = (torch.arange(len(idx), device=idx.device).unsqueeze(1), idx) if members else idx
            x, y = images[at], labels[at]
        if mix is not None:
            x = dsa_mixed(x, *mix)
        elif seed is not None:
            x = torch.stack([dsa(xk, sk) for xk, sk in zip(x, seed, strict=True)]) if members else dsa(x, seed)
        logits = fm(theta, x)
        if members:  # the mean over all K*b rows, times K: the sum of the members' means
            logits, y = logits.flatten(0, 1), y.flatten(0, 1)
        ce = F.cross_entropy(logits, y) * (len(theta) if members else 1)
        (g,) = torch.autograd.grad(ce, theta, create_graph=create_graph)
        return g

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t


def meta_gradient(
    fm: FlatModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: torch.Tensor,
    start: torch.Tensor,
    target: torch.Tensor,
    plan: StepPlan,
    memory: str = "full",
    *,
    loss_mask: MaskFn | None = None,
    unroll_keep: torch.Tensor | None = None,
    batch_grad: BatchGradient | None = None,
    label_logits: torch.Tensor | None = None,
    keep_graphs: int = 0,
) -> MetaResult:
    """Unroll the student, build the loss mask, and return the loss and its gradients.

    Args:
        fm: Flat view of the student network.
        images: Synthetic images X ``(n, C, H, W)`` (values only; no grad needed on input).
        labels: ``(n,)`` int64.
        lr: alpha, a 0-dim tensor.
        start, target: theta*_t and theta*_{t+M}, ``(P,)``. With K members every one of these, the
            masks and the label logits have a leading axis K (and ``plan`` is a ``StepPlan.stack``).
        plan: Per-step batches and DSA seeds (N = ``len(plan)``).
        memory: ``full`` or ``low``.
        loss_mask: Called once with (theta_N detached, target, start) for the loss mask; ``None``
            means MTT's unmasked loss.
        unroll_keep: bool ``(P,)``: only these parameters move during the unroll, the others stay
            at ``start`` (DPD's ``network`` mode); ``None`` lets every parameter move.
        batch_grad: How the inner gradient of a mini-batch is computed (``BatchGradient``, the
            default, on one process; ``dpd_cli.core.parallel.ShardedGradient`` splits every
            mini-batch over the ranks of torchrun, each returning the same whole result).
        label_logits: Learnable soft labels ``(n, C)``: the student trains on softmax(label_logits)
            instead of ``labels``, and dL/d(label_logits) is returned too.
        keep_graphs: With ``memory="low"``: keep the last this many steps' graphs from the forward
            sweep instead of recomputing them (more than N means N; the last step's is always
            kept, at no cost in peak memory). Ignored by ``full``.

    Returns:
        Loss, dL/dX, dL/dalpha, the loss mask used, and dL/d(label_logits) with soft labels (per member).
    """
    if keep_graphs < 0:
        raise ValueError(f"keep_graphs must be >= 0, got {keep_graphs}")
    u = None if unroll_keep is None else unroll_keep.to(start.dtype)
    grad = batch_grad or BatchGradient()
    if memory == "low":
        return _meta_low(fm, images, labels, lr, start, target, plan, loss_mask, u, grad, label_logits, keep_graphs)
    return _meta_full(fm, images, labels, lr, start, target, plan, loss_mask, u, grad, label_logits)


def _meta_full(fm, images, labels, lr, start, target, plan, loss_mask, u, grad, label_logits=None) -> MetaResult:
    x = images.detach().requires_grad_(True)
    a = lr.detach().requires_grad_(True)
    theta = start.detach().requires_grad_(True)
    leaves = [x, a]
    with torch.enable_grad():
        if label_logits is not None:
            ylog = label_logits.detach().requires_grad_(True)
            leaves.append(ylog)
            labels = F.softmax(ylog, dim=-1)  # (n, C) targets, differentiable w.r.t. the logits
        for idx, seed, mix in plan.steps():
            g = grad(fm, theta, x, labels, idx, seed, mix, create_graph=True)
            theta = theta - _per(a, g) * (g if u is None else u * g)
        keep = None if loss_mask is None else loss_mask(theta.detach(), target, start)
        loss = matching_loss(theta, target, start, keep)
        grads = [grad.reduce(t) for t in torch.autograd.grad(loss.sum(), leaves)]
    return MetaResult(loss.detach(), grads[0], grads[1], keep, grads[2] if label_logits is not None else None)


def _meta_low(
    fm, images, labels, lr, start, target, plan, loss_mask, u, grad, label_logits=None, keep_graphs=0
) -> MetaResult:
    a = lr.detach()
    n_steps = len(plan)
    # Steps first_kept..N-1 keep their graphs. The last one always: the backward sweep starts with it, so
    # keeping it adds nothing to the peak (one step's graph) and saves its recomputation.
    first_kept = max(n_steps - max(keep_graphs, 1), 0)
    soft = label_logits is not None
    x = images.detach().requires_grad_(True)
    if soft:
        ylog = label_logits.detach().requires_grad_(True)
        with torch.no_grad():
            plain_labels = F.softmax(ylog, dim=-1)  # the recomputed steps' forward sweep needs no graph to the logits
    else:
        plain_labels = labels
    kept = {}  # n -> (theta_n leaf, g_n with its graph): the steps whose graphs the backward sweep reuses
    # Forward: only theta_0..theta_N are kept, in one buffer allocated once.   (N+1, P)
    thetas = torch.empty((n_steps + 1, *start.shape), dtype=start.dtype, device=start.device)
    thetas[0] = start.detach()
    with torch.enable_grad():
        steps = list(plan.steps())
        for n, (idx, seed, mix) in enumerate(steps):
            if n < first_kept:
                theta = thetas[n].detach().requires_grad_(True)
                g = grad(fm, theta, x.detach(), plain_labels, idx, seed, mix, create_graph=False)
            else:
                # Its own copy: writing theta_{n+1} into the buffer bumps the version of every row's view.
                theta = thetas[n].clone().requires_grad_(True)
                targets = F.softmax(ylog, dim=-1) if soft else labels  # one softmax node per step: freed with it
                g_graph = grad(fm, theta, x, targets, idx, seed, mix, create_graph=True)
                kept[n] = (theta, g_graph)
                g = g_graph.detach()
            with torch.no_grad():
                torch.sub(thetas[n], _per(a, g) * (g if u is None else u * g), out=thetas[n + 1])
        end = thetas[n_steps].detach().requires_grad_(True)
        keep = None if loss_mask is None else loss_mask(end.detach(), target, start)
        loss = matching_loss(end, target, start, keep)
        (lam,) = torch.autograd.grad(loss.sum(), end)  # dL/dtheta_N
    # Backward: reuse the kept graphs, recompute the others one step at a time.
    grad_x, grad_a = torch.zeros_like(x), torch.zeros_like(a)
    grad_y = torch.zeros_like(ylog) if soft else None
    with torch.enable_grad():
        for n in range(n_steps - 1, -1, -1):
            if n in kept:
                theta, g = kept.pop(n)
            else:
                theta = thetas[n].detach().requires_grad_(True)
                targets = F.softmax(ylog, dim=-1) if soft else labels
                idx, seed, mix = steps[n]
                g = grad(fm, theta, x, targets, idx, seed, mix, create_graph=True)
            mu = lam if u is None else u * lam
            if soft:
                d_theta, d_x, d_y = torch.autograd.grad(g, [theta, x, ylog], grad_outputs=mu)
                grad_y.sub_(_per(a, d_y) * d_y)
            else:
                d_theta, d_x = torch.autograd.grad(g, [theta, x], grad_outputs=mu)
            grad_a -= (mu * g.detach()).sum(-1)
            grad_x.sub_(_per(a, d_x) * d_x)
            lam = lam - _per(a, lam) * grad.reduce(d_theta)  # the vector-Hessian product of the whole batch
            del g, theta
    grad_x, grad_a = grad.reduce(grad_x), grad.reduce(grad_a)
    return MetaResult(loss.detach(), grad_x, grad_a, keep, grad.reduce(grad_y) if soft else None)
