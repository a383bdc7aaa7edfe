"""The plain supervised loop shared by expert training and evaluation, for one network or a ``Stack`` of them."""

from __future__ import annotations

import copy
import random

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from dpd_cli import interrupt
from dpd_cli.core.augment import dsa
from dpd_cli.models import build_model, set_fused

__all__ = ["Stack", "fresh", "sgd", "train_epoch", "accuracy"]


class Stack:
    """K networks of one architecture trained as one: their parameters stacked ``(K, ...)``, the forward vmapped.

    Members share nothing, so the gradient of their summed losses is each member's own gradient. ``self(x)`` maps
    ``(K, B, ...)`` images (a batch per member) to ``(K, B, classes)``. Batch norm's running statistics are
    stacked buffers that vmap updates per member.
    """

    def __init__(self, nets: list[nn.Module]):
        self.params, self.buffers = stack_module_state(nets)
        self.k, self.base = len(nets), copy.deepcopy(nets[0]).to("meta")
        self._forward = vmap(lambda p, b, x: functional_call(self.base, (p, b), (x,)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # dpd's fused instance norm (ResNet-18, VGG-11) is an autograd.Function without a vmap rule:
        # run torch.nn.functional's group norm instead, the same function.
        fused = set_fused(False)
        try:
            return self._forward(self.params, self.buffers, x)
        finally:
            set_fused(fused)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def train(self, mode: bool = True) -> Stack:
        self.base.train(mode)
        return self

    def eval(self) -> Stack:
        return self.train(False)

    def flatten(self) -> torch.Tensor:
        """``(K, P)``: each member's parameters as ``FlatModel.flatten`` lays them out (a copy)."""
        return torch.cat([p.detach().reshape(self.k, -1) for p in self.params.values()], 1)


class _StackSGD:
    """``torch.optim.SGD`` (no dampening, no Nesterov) on a ``Stack``'s parameters, with one lr per member."""

    def __init__(self, params: list[torch.Tensor], lrs: list[float], momentum: float, weight_decay: float):
        self.params, self.momentum, self.weight_decay = params, momentum, weight_decay
        self.lr = torch.tensor(lrs, dtype=params[0].dtype, device=params[0].device)
        self.bufs: list[torch.Tensor | None] = [None] * len(params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            d = p.grad.add(p, alpha=self.weight_decay) if self.weight_decay else p.grad
            if self.momentum:
                if self.bufs[i] is None:
                    self.bufs[i] = d.clone()
                else:
                    self.bufs[i].mul_(self.momentum).add_(d)
                d = self.bufs[i]
            p.sub_(d * self.lr.view(-1, *[1] * (p.dim() - 1)))


def fresh(spec, seeds: list[int], device: torch.device, x, y) -> tuple:
    """``(net, x, y, gen, rng)`` for ``train_epoch``: each network built after ``torch.manual_seed(seed)``, its
    shuffles drawn by ``Generator().manual_seed(seed)`` and its DSA seeds by ``Random(seed)``. One seed: the
    network itself; several: a ``Stack``, with ``x``, ``y`` (tensors, or lists of one per member) and the streams
    as lists, so that each member trains as it would alone."""
    nets = []
    for seed in seeds:
        torch.manual_seed(seed)
        nets.append(build_model(spec).to(device))
    xs, ys = (v if isinstance(v, list) else [v] * len(seeds) for v in (x, y))
    gens, rngs = [torch.Generator().manual_seed(s) for s in seeds], [random.Random(s) for s in seeds]
    return (nets[0], xs[0], ys[0], gens[0], rngs[0]) if len(nets) == 1 else (Stack(nets), xs, ys, gens, rngs)


def sgd(net: nn.Module | Stack, lrs: list[float], momentum: float, weight_decay: float):
    """A fresh SGD optimiser (zero momentum) for ``net``: ``torch.optim.SGD``, or per member of a ``Stack``."""
    if isinstance(net, Stack):
        return _StackSGD(net.parameters(), lrs, momentum, weight_decay)
    return torch.optim.SGD(net.parameters(), lr=lrs[0], momentum=momentum, weight_decay=weight_decay)


def train_epoch(
    net: nn.Module | Stack, opt, x, y, batch: int, gen, rng, augment: bool, count_correct: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One epoch of SGD over ``(x, y)`` (on the device, in training space); checks for a stop before every batch.

    ``y`` holds class indices ``(N,)`` or class probabilities ``(N, C)`` (soft labels: soft cross-entropy).
    ``gen`` (CPU) draws the shuffle, ``rng`` the per-batch DSA seeds. ``count_correct=False`` skips the count
    of correctly classified images (a few small operations per batch, which a GPU pays for in launches).
    For a ``Stack`` of K, ``x``, ``y``, ``gen`` and ``rng`` are lists of K (one per member; the same tensor may
    repeat) of equal sizes and the results have shape ``(K,)``: each member's epoch is the one it would have alone.
    Returns ``(summed loss, number correct or None)`` as device tensors: no host sync inside the loop.
    """
    many = isinstance(net, Stack)
    xs, ys, gens, rngs = (x, y, gen, rng) if many else ([x], [y], [gen], [rng])
    net.train()
    n, device = xs[0].shape[0], xs[0].device
    orders = [torch.randperm(n, generator=g).to(device, non_blocking=True) for g in gens]
    # The sums start at the first batch's values rather than at zero: at one batch per epoch (evaluation
    # at small IPC) that saves two of the three operations the loss sum costs, which a GPU pays in launches.
    loss_sum = correct = None
    for i in range(0, n, batch):
        interrupt.check("training stopped mid-epoch")  # callers re-raise with their own resume hint
        idx = [o[i : i + batch] for o in orders]
        xb = [dsa(xk[j], r.getrandbits(63)) if augment else xk[j] for xk, j, r in zip(xs, idx, rngs)]
        yb = [yk[j] for yk, j in zip(ys, idx)]
        if many:
            xb, yb = torch.stack(xb), torch.stack(yb)
            out = net(xb)
            losses = F.cross_entropy(out.flatten(0, 1), yb.flatten(0, 1), reduction="none")
            loss = losses.view(len(xs), -1).mean(1)  # each member's mean over its batch
        else:
            xb, yb = xb[0], yb[0]
            out = net(xb)
            loss = F.cross_entropy(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        batch_loss = loss.detach() * len(idx[0])
        loss_sum = batch_loss if loss_sum is None else loss_sum.add_(batch_loss)
        if count_correct:  # soft labels (class probabilities) count as right when the top class agrees
            right = (out.detach().argmax(-1) == (yb if yb.dim() < out.dim() else yb.argmax(-1))).sum(-1)
            correct = right if correct is None else correct.add_(right)
    shape = (len(xs),) if many else ()
    if loss_sum is None:  # no images
        loss_sum = torch.zeros(shape, device=device)
    if count_correct and correct is None:
        correct = torch.zeros(shape, device=device, dtype=torch.long)
    return loss_sum, correct


@torch.no_grad()
def accuracy(net: nn.Module | Stack, x: torch.Tensor, y: torch.Tensor, batch: int = 1000):
    """Top-1 accuracy in [0, 1] of ``net`` (eval mode) on ``(x, y)``; for a ``Stack``, a list (one per member)."""
    net.eval()
    many = isinstance(net, Stack)
    correct = torch.zeros(net.k if many else (), device=x.device, dtype=torch.long)
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch]
        correct += (net(xb.expand(net.k, *xb.shape) if many else xb).argmax(-1) == y[i : i + batch]).sum(-1)
    return (correct.double() / max(1, x.shape[0])).tolist()
