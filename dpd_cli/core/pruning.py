"""Which parameters DPD prunes: the criterion, the selection, and the state kept across iterations.

Notation as in docs/algorithm.md ("The DPD mask"): theta_N is where the student ends, theta*_t
its start and theta*_{t+M} the target, P parameters split into layers of P_l entries.

criterion (a score per parameter, higher = harder to align)::

    abs         d = |theta_N - theta*_{t+M}|
    relative    d / (|theta*_t - theta*_{t+M}| + eps)
    layer-z     (d - mean_l(d)) / std_l(d)          standardised within each layer
    layer-rank  rank of d within its layer / P_l     in (0, 1], 1 = the layer's largest

selection: the ceil(rho * n) largest scores (direction ``largest``, DPD's reading) or smallest
(``smallest``, PAD's loss-based selection) over all P parameters (scope ``global``) or within
each layer (scope ``layer``).

mask source: this iteration's scores (``step``), or an exponential moving average of every
parameter's score over iterations (``ema``: s <- beta * s + (1 - beta) * score, started at the
first score). In mode ``network`` the mask must be known before the unroll, so it comes from the
state *before* this iteration: the EMA so far (``ema``) or the previous iteration's scores
(``step``); the first iteration prunes nothing.

``Pruner`` holds that state; everything else here is a pure function of its arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

__all__ = ["CRITERIA", "PruneConfig", "prune_count", "criterion_scores", "select_keep", "prune_keep_mask", "Pruner"]

CRITERIA = ("abs", "relative", "layer-z", "layer-rank")


@dataclass(frozen=True)
class PruneConfig:
    ratio: float = 0.0  # rho
    scope: str = "global"  # global | layer
    criterion: str = "abs"  # CRITERIA
    direction: str = "largest"  # largest | smallest
    mask: str = "step"  # step | ema
    ema_beta: float = 0.9  # mask "ema": weight of the past
    mode: str = "loss"  # loss | network
    eps: float = 1e-12  # relative criterion: d / (|start - target| + eps)
    warmup: int = 0  # iterations 0..warmup-1 prune nothing

    @classmethod
    def from_settings(cls, s) -> PruneConfig:
        """From ``dpd distill``'s settings (their ``prune_*`` fields and ``ema_beta``)."""
        fields = ("ratio", "scope", "criterion", "direction", "mask", "mode", "warmup")
        return cls(ema_beta=s.ema_beta, **{f: getattr(s, f"prune_{f}") for f in fields})

    def ratio_at(self, iteration: int) -> float:
        """rho in force at ``iteration`` (0 during the warm-up)."""
        return 0.0 if iteration < self.warmup else self.ratio

    def rule(self) -> dict:
        """The settings in force, as recorded next to the prune counts and in every checkpoint."""
        rule = {k: v for k, v in asdict(self).items() if k not in ("ema_beta", "eps")}
        return rule | ({"ema_beta": self.ema_beta} if self.mask == "ema" else {})

    def text(self) -> str:
        """``global/abs/largest/step/loss`` (``ema0.9`` for the EMA mask): which parameters are pruned, and how."""
        mask = f"ema{self.ema_beta:g}" if self.mask == "ema" else "step"
        return f"{self.scope}/{self.criterion}/{self.direction}/{mask}/{self.mode}"


def prune_count(ratio: float, n: int) -> int:
    """ceil(rho * n), never all of them (the loss needs at least one parameter)."""
    if ratio <= 0 or n <= 1:
        return 0
    return min(n - 1, math.ceil(round(ratio * n, 9)))


def criterion_scores(
    student_end: torch.Tensor,
    target: torch.Tensor,
    start: torch.Tensor,
    criterion: str,
    layer_sizes: list[int],
    eps: float = 1e-12,
) -> torch.Tensor:
    """The score of every parameter, ``(P,)``, detached; higher means harder to align.

    Args:
        student_end: theta_N (values only).
        target: theta*_{t+M}.
        start: theta*_t (the relative criterion).
        criterion: one of ``CRITERIA``.
        layer_sizes: P_l per layer in flat order (the layer-wise criteria).
    """
    with torch.no_grad():
        d = (student_end.detach() - target).abs()
        if criterion == "abs":
            return d
        if criterion == "relative":
            return d / ((start - target).abs() + eps)
        if criterion == "layer-z":
            sizes = torch.tensor(layer_sizes, device=d.device)
            ids = torch.repeat_interleave(torch.arange(len(layer_sizes), device=d.device), sizes)  # (P,) layer index
            n = torch.tensor(layer_sizes, device=d.device, dtype=d.dtype)
            mean = torch.zeros(len(layer_sizes), device=d.device, dtype=d.dtype).index_add_(0, ids, d) / n
            centred = d - mean[ids]
            var = torch.zeros_like(mean).index_add_(0, ids, centred * centred) / n  # population variance
            std = var.sqrt()
            # A layer whose residuals are all equal has no spread: every entry scores 0 (average).
            return torch.where(
                std[ids] > 0, centred / std[ids].clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(d)
            )
        if criterion == "layer-rank":
            out = torch.empty_like(d)
            for seg, ranks in zip(d.split(layer_sizes), out.split(layer_sizes), strict=True):
                order = torch.argsort(seg, stable=True)  # ascending: the largest gets rank P_l
                ranks[order] = torch.arange(1, len(seg) + 1, device=d.device, dtype=d.dtype) / len(seg)
            return out
    raise ValueError(f"unknown prune criterion {criterion!r}; known: {', '.join(CRITERIA)}")


def select_keep(
    scores: torch.Tensor, ratio: float, scope: str, direction: str, layer_sizes: list[int]
) -> torch.Tensor | None:
    """The kept set as a bool ``(P,)`` tensor (False = pruned); ``None`` when nothing is pruned.

    ``ceil(ratio * n)`` entries with the largest (or smallest) scores are pruned, over all entries
    (``global``) or within each layer (``layer``); ties are broken arbitrarily (``torch.topk``).
    """
    if ratio <= 0:
        return None
    keep = torch.ones_like(scores, dtype=torch.bool)
    sizes = [scores.numel()] if scope == "global" else layer_sizes
    for seg, kept in zip(scores.split(sizes), keep.split(sizes), strict=True):
        k = prune_count(ratio, len(seg))
        if k:
            # index_fill_ takes the value as a kernel argument; `kept[idx] = False` would copy a host
            # tensor to the device (a synchronisation on CUDA).
            kept.index_fill_(0, torch.topk(seg, k, largest=direction == "largest", sorted=False).indices, False)
    return keep


def prune_keep_mask(
    student_end: torch.Tensor, target: torch.Tensor, start: torch.Tensor, cfg: PruneConfig, layer_sizes: list[int]
) -> torch.Tensor | None:
    """This iteration's mask from this iteration's residuals (mask ``step``, mode ``loss``)."""
    if cfg.ratio <= 0:
        return None
    scores = criterion_scores(student_end, target, start, cfg.criterion, layer_sizes, cfg.eps)
    return select_keep(scores, cfg.ratio, cfg.scope, cfg.direction, layer_sizes)


class Pruner:
    """The DPD mask of each iteration, with the state it carries across iterations.

    The state is a ``(P,)`` float32 tensor (or ``None`` before the first iteration): the EMA of the
    scores (mask ``ema``) or the previous iteration's scores (mode ``network`` with mask ``step``);
    plain ``step``/``loss`` pruning keeps none. It is stored in every checkpoint so a resumed run
    repeats an uninterrupted one exactly.

    Per iteration::

        keep_unroll = pruner.unroll_keep(ratio)              # mode network: frozen during the unroll
        res = meta_gradient(..., loss_mask=pruner.loss_mask(ratio), unroll_keep=keep_unroll)
        pruner.commit()                                      # fold this iteration's scores into the state

    Args:
        cfg: The prune settings (``cfg.ratio`` is the run's rho; the per-iteration ratio passed to the
            methods is 0 during the warm-up).
        layer_sizes: P_l per layer.
        state: A state restored from a checkpoint.
    """

    def __init__(self, cfg: PruneConfig, layer_sizes: list[int], state: torch.Tensor | None = None):
        self.cfg = cfg
        self.layer_sizes = layer_sizes
        self.state = state
        self._pending: torch.Tensor | None = None

    @property
    def enabled(self) -> bool:
        """rho = 0 is plain MTT: no scores are computed and no state is kept."""
        return self.cfg.ratio > 0

    @property
    def keeps_state(self) -> bool:
        return self.enabled and (self.cfg.mask == "ema" or self.cfg.mode == "network")

    def _blend(self, scores: torch.Tensor) -> torch.Tensor:
        if self.cfg.mask != "ema" or self.state is None:
            return scores
        b = self.cfg.ema_beta
        return b * self.state + (1 - b) * scores

    def unroll_keep(self, ratio: float) -> torch.Tensor | None:
        """Mode ``network``: the parameters that may move during the unroll (``None``: all of them)."""
        if self.cfg.mode != "network" or ratio <= 0 or self.state is None:
            return None
        return select_keep(self.state, ratio, self.cfg.scope, self.cfg.direction, self.layer_sizes)

    def loss_mask(
        self, ratio: float, unroll_keep: torch.Tensor | None = None
    ) -> Callable[..., torch.Tensor | None] | None:
        """The function ``meta_gradient`` calls with (theta_N, target, start) to get the loss mask.

        ``None`` when rho = 0 (the plain MTT path). It records this iteration's scores for ``commit``.
        """
        if not self.enabled:
            return None

        def mask(student_end: torch.Tensor, target: torch.Tensor, start: torch.Tensor) -> torch.Tensor | None:
            scores = criterion_scores(student_end, target, start, self.cfg.criterion, self.layer_sizes, self.cfg.eps)
            self._pending = scores
            if self.cfg.mode == "network":
                return unroll_keep  # the frozen parameters leave the loss too
            return select_keep(self._blend(scores), ratio, self.cfg.scope, self.cfg.direction, self.layer_sizes)

        return mask

    def commit(self) -> None:
        """Fold the scores of the iteration just computed into the state."""
        if self._pending is None:
            return
        if self.keeps_state:
            self.state = self._blend(self._pending) if self.cfg.mask == "ema" else self._pending
        self._pending = None
