"""K distillations as one computation (``dpd distill --seeds``, ``dpd study --concurrent``), and the loop that
steps one run or K of them.

Each run is a ``DistillRecipe`` of its own (settings, run directory, state, random draws, checkpoints, as it
would have them alone); every iteration their meta-gradients are one ``meta_gradient`` call over the K runs
stacked along a leading member axis (``dpd_cli.core.matching``), eagerly (no CUDA graphs). So the runs may
differ only in what changes a run's own draws, updates or masks (``PER_RUN``); every other setting shapes the
shared computation and must be the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from dpd_cli import interrupt
from dpd_cli.config.settings import DistillSettings
from dpd_cli.core import matching, parallel
from dpd_cli.errors import DivergedError, SettingsError, StorageError
from dpd_cli.events import DistillDone, Message, NullSink, Sink

__all__ = ["BatchRecipe", "PER_RUN", "shared_settings", "train"]

#: Settings that may differ between the runs of a batch: each changes only its run's own draws (seed, expert
#: epochs), initial state (init, lr_teacher, label_epoch), updates (learning rates), prune masks, or outputs.
PER_RUN = frozenset(
    "seed seeds out resume force lr_img lr_img_warmup clip_img lr_lr lr_teacher lr_y momentum_y label_epoch init "
    "expert_epochs max_start_epoch prune_ratio prune_scope prune_criterion prune_direction prune_mask prune_ema_beta "
    "prune_mode prune_warmup checkpoint_every keep_checkpoints log_every cuda_graphs".split()
)


def shared_settings(s: DistillSettings) -> dict:
    """The settings that shape the batched computation: runs batch together only where these are equal."""
    return {k: v for k, v in s.model_dump(mode="json").items() if k not in PER_RUN}


def _check_compatible(runs: list) -> None:
    """Refuse a batch whose runs differ in a setting outside ``PER_RUN`` (``SettingsError`` naming them)."""
    first = shared_settings(runs[0].s)
    for r in runs[1:]:
        mine = shared_settings(r.s)
        diffs = [f"--{k.replace('_', '-')} ({mine[k]!r} against {first[k]!r})" for k in first if mine[k] != first[k]]
        if diffs:
            raise SettingsError(
                f"{r.run_dir} cannot join {runs[0].run_dir} in one batch: they differ in {', '.join(diffs)}. Runs "
                "batched together may differ only in their seed, output, learning rates, initial images and "
                "prune settings; run the others separately."
            )


def train(step: Callable[[list], None], runs: list, keep_going: bool = False) -> list[Path | DivergedError]:
    """``step(live)`` (the live runs, ``DistillRecipe``s, one iteration on) until ``--iterations``; each run
    flushes and checkpoints as on its own: every ``--checkpoint-every`` and, before ``Interrupted`` is raised,
    on a stop request. A run that diverges raises its ``DivergedError``, or with ``keep_going`` drops out (the
    error in its place) while the others go on. Returns the run directories."""
    t_run = time.perf_counter()
    for r in runs:
        r._window_t0 = t_run
    live, ended = list(runs), {}

    def settle(r, write: Callable[[], object]) -> None:  # flush or checkpoint run r; drop it if it diverged
        try:
            write()
        except DivergedError as err:
            if not keep_going:
                raise
            live.remove(r)
            ended[r] = err

    while live and live[0].state.iteration < live[0].s.iterations:
        if live[0]._stop_requested():
            for r in live:
                r.checkpoint()
            dirs = ", ".join(str(r.run_dir) for r in live)
            raise interrupt.Interrupted(
                f"stopped after iteration {live[0].state.iteration}; rerun the same command with --resume to "
                f"continue {dirs}"
            )
        step(live)
        for r in list(live):
            if len(r._pending) >= r.log_every:
                settle(r, r.flush)
            if r in live and r.state.iteration % r.s.checkpoint_every == 0 and r.state.iteration < r.s.iterations:
                settle(r, r.checkpoint)
    for r in list(live):
        settle(r, r.checkpoint)
        if r in live:
            seconds = time.perf_counter() - t_run
            r.sink.emit(DistillDone(str(r.run_dir), r.s.iterations, r.last_loss, float(r.state.lr), seconds))
    return [ended.get(r, r.run_dir) for r in runs]


class BatchRecipe:
    """K distillations as one computation: ``runs`` (their settings), each a ``recipe`` (``DistillRecipe``) of
    its own, that may differ only in ``PER_RUN`` (else ``SettingsError``) and must start at the same iteration
    (else ``StorageError``); ``sink`` shows the first run's progress and every run's messages and end."""

    def __init__(self, runs: list[DistillSettings], sink: Sink | None, recipe: type):
        if parallel.world_from_env()[1] > 1:
            raise SettingsError("--seeds runs on one process: under torchrun, launch one --seed per run.")
        sink = sink or NullSink()
        dirs = [recipe.run_dir_for(s) for s in runs]
        sink.emit(
            Message(f"{len(runs)} runs in one batch, the progress shown is the first's: {', '.join(map(str, dirs))}")
        )
        by_seed = len({s.seed for s in runs}) == len(runs)
        self.runs: list = []
        try:
            for k, (s, d) in enumerate(zip(runs, dirs, strict=True)):
                self.runs.append(recipe(s, _RunSink(sink, f"seed {s.seed}" if by_seed else str(d), progress=k == 0)))
                self.runs[-1].in_batch = True
            _check_compatible(self.runs)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> BatchRecipe:
        try:
            for r in self.runs:
                r.setup()
            at = {r.state.iteration for r in self.runs}
            if len(at) > 1:
                where = ", ".join(f"{r.run_dir} at iteration {r.state.iteration}" for r in self.runs)
                raise StorageError(
                    f"A batch resumes its runs together, but they stopped at different iterations ({where}). "
                    f"Bring the others to iteration {max(at)} on their own (dpd distill --seed S --out DIR "
                    f"--resume --iterations {max(at)}), then resume them together."
                )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for r in self.runs:
            r.close()

    def step(self, live: list | None = None) -> None:
        """One iteration of the ``live`` runs (default: all): each draws as on its own, one meta-gradient for
        all, each updates itself (with its own prune ratio, mask, learning rates)."""
        live = live or self.runs
        draws = [r.draw() for r in live]
        parts = [r.problem(r.prune.ratio_at(d[0])) for r, d in zip(live, draws, strict=True)]
        keeps = [p["unroll_keep"] for p in parts]
        if any(k is not None for k in keeps):  # --prune-mode network: a member that freezes nothing moves all
            keeps = [torch.ones_like(d[3], dtype=torch.bool) if k is None else k for k, d in zip(keeps, draws)]
        first = live[0]
        res = matching.meta_gradient(
            first.fm,
            **{k: torch.stack([p[k] for p in parts]) for k in ("images", "labels", "lr")},
            start=torch.stack([d[3] for d in draws]),
            target=torch.stack([d[4] for d in draws]),
            plan=matching.StepPlan.stack([d[5] for d in draws]),
            memory=first.s.memory,
            keep_graphs=first.s.keep_graphs,
            loss_mask=matching.stack_masks([p["loss_mask"] for p in parts]),
            unroll_keep=None if keeps[0] is None else torch.stack(keeps),
            label_logits=None if parts[0]["label_logits"] is None else torch.stack([p["label_logits"] for p in parts]),
        )
        for k, (r, d) in enumerate(zip(live, draws, strict=True)):
            r.update(res.member(k), d[1], d[2])

    def train(self, keep_going: bool = False) -> list[Path | DivergedError]:
        """As ``DistillRecipe.train``, for all the runs together (see ``train``); returns their run directories."""
        return train(self.step, self.runs, keep_going)


class _RunSink:
    """What one run of a batch reports: its messages (marked with its ``name``) and its end; the first run its
    progress too (all move together)."""

    def __init__(self, sink: Sink, name: str, progress: bool):
        self.sink, self.name, self.progress = sink, name, progress

    def emit(self, event) -> None:
        if isinstance(event, Message):
            self.sink.emit(Message(f"{self.name}: {event.text}", event.level))
        elif self.progress or isinstance(event, DistillDone):
            self.sink.emit(event)

    def close(self) -> None:
        pass
