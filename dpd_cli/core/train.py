"""The plain supervised loop shared by expert training and evaluation."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from dpd_cli import interrupt
from dpd_cli.core.augment import dsa

__all__ = ["train_epoch", "accuracy"]


def train_epoch(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    gen: torch.Generator,
    rng: random.Random,
    augment: bool,
    count_correct: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One epoch of SGD over ``(x, y)`` (on the device, in training space); checks for a stop before every batch.

    ``y`` holds class indices ``(N,)`` or class probabilities ``(N, C)`` (soft labels: soft cross-entropy).
    ``gen`` (CPU) draws the shuffle, ``rng`` the per-batch DSA seeds. ``count_correct=False`` skips the count
    of correctly classified images (a few small operations per batch, which a GPU pays for in launches).
    Returns ``(summed loss, number correct or None)`` as device tensors: no host sync inside the loop.
    """
    net.train()
    n = x.shape[0]
    order = torch.randperm(n, generator=gen).to(x.device, non_blocking=True)
    # The sums start at the first batch's values rather than at zero: at one batch per epoch (evaluation
    # at small IPC) that saves two of the three operations the loss sum costs, which a GPU pays in launches.
    loss_sum = correct = None
    for i in range(0, n, batch):
        interrupt.check("training stopped mid-epoch")  # callers re-raise with their own resume hint
        idx = order[i : i + batch]
        xb, yb = x[idx], y[idx]
        if augment:
            xb = dsa(xb, rng.getrandbits(63))
        out = net(xb)
        loss = F.cross_entropy(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        batch_loss = loss.detach() * len(idx)
        loss_sum = batch_loss if loss_sum is None else loss_sum.add_(batch_loss)
        if count_correct:  # soft labels (class probabilities, (B, C)) count as right when the top class agrees
            right = (out.detach().argmax(1) == (yb if yb.dim() == 1 else yb.argmax(1))).sum()
            correct = right if correct is None else correct.add_(right)
    if loss_sum is None:  # no images
        loss_sum = torch.zeros((), device=x.device)
    if count_correct and correct is None:
        correct = torch.zeros((), device=x.device, dtype=torch.long)
    return loss_sum, correct


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] of ``net`` (eval mode) on ``(x, y)``."""
    net.eval()
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, x.shape[0], batch):
        correct += (net(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()
    return correct.item() / max(1, x.shape[0])
