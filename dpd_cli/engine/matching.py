"""Trajectory matching with the DPD mask: the student unroll, the mask, the loss, the meta-gradient.

Notation (DESIGN.md section 2): a student starts at the expert's epoch-t parameters
``start`` = theta*_t and takes N SGD steps on the synthetic images X with learnable step
size alpha::

    theta_{n+1} = theta_n - alpha * grad_theta CE(f(DSA(X_{b_n}); theta_n), Y_{b_n})

The residual ``delta = |theta_N - target|`` (target = theta*_{t+M}) ranks parameters; the
ceil(rho * P) largest (global scope; per layer: ceil(rho * P_l) within each layer) are
pruned from

    L = sum(m * (theta_N - target)^2) / sum(m * (start - target)^2),   m = 0 on pruned, 1 elsewhere.

rho = 0 takes the plain MTT path (no mask is built or multiplied in).

Two ways to get dL/dX and dL/dalpha, equal up to rounding:

* ``full``: keep all N steps' double-backward graph alive and call autograd once (MTT).
* ``low``: keep only the N flat parameter vectors; walk backwards recomputing one step's
  graph at a time. With lambda = dL/dtheta_{n+1} and g_n = grad_theta CE at step n:
      dL/dalpha += -<lambda, g_n>
      dL/dX     += -alpha * (d g_n / dX)^T lambda          (vector-Jacobian product)
      lambda    <- lambda - alpha * (d g_n / d theta_n)^T lambda   (vector-Hessian product)
  Peak memory is one step's graph, flat in N. This is exact, not TESLA's approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpd_cli.augment import dsa
from dpd_cli.models import FlatModel

__all__ = ["StepPlan", "PruneConfig", "prune_count", "prune_keep_mask", "matching_loss", "meta_gradient", "MetaResult"]


@dataclass
class StepPlan:
    """The randomness of one unroll, so that it can be replayed exactly.

    Attributes:
        batches: Per step, indices into the synthetic set, or ``None`` for all images.
        seeds: Per step, the DSA seed, or ``None`` for no augmentation.
    """

    batches: list[torch.Tensor | None]
    seeds: list[int | None]

    def __len__(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class PruneConfig:
    ratio: float = 0.0  # rho
    scope: str = "global"  # global | layer
    criterion: str = "abs"  # abs | relative
    eps: float = 1e-12  # relative criterion: delta / (|start - target| + eps)


@dataclass
class MetaResult:
    loss: torch.Tensor  # () detached
    grad_images: torch.Tensor  # like X
    grad_lr: torch.Tensor  # () like alpha
    keep: torch.Tensor | None  # (P,) bool, False = pruned; None when rho = 0


def prune_count(ratio: float, n: int) -> int:
    """ceil(rho * n), never all of them (the loss needs at least one parameter)."""
    if ratio <= 0 or n <= 1:
        return 0
    return min(n - 1, math.ceil(round(ratio * n, 9)))


def prune_keep_mask(
    student_end: torch.Tensor,
    target: torch.Tensor,
    start: torch.Tensor,
    cfg: PruneConfig,
    layer_sizes: list[int],
) -> torch.Tensor | None:
    """The DPD mask as a bool ``(P,)`` tensor, True = kept; ``None`` when nothing is pruned.

    Args:
        student_end: theta_N (its values only are used).
        target: theta*_{t+M}.
        start: theta*_t (only for the relative criterion).
        cfg: ratio, scope and criterion.
        layer_sizes: P_l for each layer in flat order (sums to P).
    """
    if cfg.ratio <= 0:
        return None
    with torch.no_grad():
        delta = (student_end.detach() - target).abs()
        if cfg.criterion == "relative":
            delta = delta / ((start - target).abs() + cfg.eps)
        keep = torch.ones_like(delta, dtype=torch.bool)
        if cfg.scope == "global":
            k = prune_count(cfg.ratio, delta.numel())
            if k:
                keep[torch.topk(delta, k, sorted=False).indices] = False
        else:
            offset = 0
            for size in layer_sizes:
                k = prune_count(cfg.ratio, size)
                if k:
                    idx = torch.topk(delta[offset : offset + size], k, sorted=False).indices
                    keep[offset + idx] = False
                offset += size
    return keep


def matching_loss(student_end: torch.Tensor, target: torch.Tensor, start: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Normalised parameter-matching loss; with ``keep=None`` exactly MTT's sum/sum."""
    if keep is None:
        return ((student_end - target) ** 2).sum() / ((start - target) ** 2).sum()
    m = keep.to(student_end.dtype)
    return (m * (student_end - target) ** 2).sum() / (m * (start - target) ** 2).sum()


def _inner_grad(fm: FlatModel, theta, images, labels, idx, seed, create_graph: bool) -> torch.Tensor:
    """grad_theta CE(f(DSA(X_b); theta), Y_b)."""
    x = images if idx is None else images[idx]
    y = labels if idx is None else labels[idx]
    if seed is not None:
        x = dsa(x, seed)
    ce = F.cross_entropy(fm(theta, x), y)
    (g,) = torch.autograd.grad(ce, theta, create_graph=create_graph)
    return g


def meta_gradient(
    fm: FlatModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: torch.Tensor,
    start: torch.Tensor,
    target: torch.Tensor,
    plan: StepPlan,
    prune: PruneConfig,
    layer_sizes: list[int],
    memory: str = "full",
) -> MetaResult:
    """Unroll the student, build the DPD mask, and return the loss and its gradients.

    Args:
        fm: Flat view of the student network.
        images: Synthetic images X ``(n, C, H, W)`` (values only; no grad needed on input).
        labels: ``(n,)`` int64.
        lr: alpha, a 0-dim tensor.
        start, target: theta*_t and theta*_{t+M}, ``(P,)``.
        plan: Per-step batches and DSA seeds (N = ``len(plan)``).
        prune: The DPD settings for this iteration.
        layer_sizes: P_l per layer.
        memory: ``full`` or ``low``.

    Returns:
        Loss, dL/dX, dL/dalpha and the mask used.
    """
    if memory == "low":
        return _meta_low(fm, images, labels, lr, start, target, plan, prune, layer_sizes)
    return _meta_full(fm, images, labels, lr, start, target, plan, prune, layer_sizes)


def _meta_full(fm, images, labels, lr, start, target, plan, prune, layer_sizes) -> MetaResult:
    x = images.detach().requires_grad_(True)
    a = lr.detach().requires_grad_(True)
    theta = start.detach().requires_grad_(True)
    with torch.enable_grad():
        for idx, seed in zip(plan.batches, plan.seeds, strict=True):
            g = _inner_grad(fm, theta, x, labels, idx, seed, create_graph=True)
            theta = theta - a * g
        keep = prune_keep_mask(theta, target, start, prune, layer_sizes)
        loss = matching_loss(theta, target, start, keep)
        gx, ga = torch.autograd.grad(loss, [x, a])
    return MetaResult(loss.detach(), gx, ga, keep)


def _meta_low(fm, images, labels, lr, start, target, plan, prune, layer_sizes) -> MetaResult:
    a = lr.detach()
    # Forward: only the flat vectors theta_0..theta_N are kept.  (N+1) x (P,)
    thetas = [start.detach()]
    with torch.enable_grad():
        for idx, seed in zip(plan.batches, plan.seeds, strict=True):
            theta = thetas[-1].requires_grad_(True)
            g = _inner_grad(fm, theta, images.detach(), labels, idx, seed, create_graph=False)
            thetas.append((theta.detach() - a * g).detach())
            thetas[-2] = theta.detach()
        end = thetas[-1].requires_grad_(True)
        keep = prune_keep_mask(end, target, start, prune, layer_sizes)
        loss = matching_loss(end, target, start, keep)
        (lam,) = torch.autograd.grad(loss, end)  # dL/dtheta_N
    # Backward: recompute one step's graph at a time.
    x = images.detach().requires_grad_(True)
    grad_x = torch.zeros_like(x)
    grad_a = torch.zeros_like(a)
    with torch.enable_grad():
        for n in range(len(plan) - 1, -1, -1):
            theta = thetas[n].detach().requires_grad_(True)
            g = _inner_grad(fm, theta, x, labels, plan.batches[n], plan.seeds[n], create_graph=True)
            grad_a -= (lam * g.detach()).sum()
            d_theta, d_x = torch.autograd.grad(g, [theta, x], grad_outputs=lam)
            grad_x.sub_(a * d_x)
            lam = lam - a * d_theta
            thetas[n + 1] = None  # free as we go
    return MetaResult(loss.detach(), grad_x, grad_a, keep)
