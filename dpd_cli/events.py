"""Typed progress events the engine emits and the views (Rich, plain, JSON) consume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Event:
    """Base class of every event."""


class Sink(Protocol):
    def emit(self, event: Event) -> None: ...

    def close(self) -> None: ...


class NullSink:
    def emit(self, event: Event) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Message(Event):
    text: str
    level: str = "info"  # info | warning


# --- experts -----------------------------------------------------------------------------
@dataclass
class ExpertsStarted(Event):
    folder: str
    indices: list[int]  # experts this process will train (its shard, unfinished ones)
    total: int
    epochs: int
    n_params: int
    device: str


@dataclass
class ExpertSkipped(Event):
    index: int
    path: str


@dataclass
class ExpertStarted(Event):
    index: int
    trainings: int = 1  # experts trained together from this one on (one batched computation)


@dataclass
class ExpertEpoch(Event):
    index: int
    epoch: int
    epochs: int
    train_loss: float
    train_acc: float
    test_acc: float
    images_per_s: float


@dataclass
class ExpertDone(Event):
    index: int
    path: str
    test_acc: float
    seconds: float


# --- experts import ----------------------------------------------------------------------
@dataclass
class ImportStarted(Event):
    folder: str
    files: list[str]  # the buffer files, in the order they are read
    n_params: int


@dataclass
class ImportFileStarted(Event):
    index: int  # position in ImportStarted.files
    path: str


@dataclass
class ImportExpert(Event):
    path: str  # the buffer file
    position: int  # the expert's position in that file
    n_experts: int  # experts in that file
    index: int  # its index in the experts folder (expert_NNNNN)
    skipped: bool  # converted by an earlier run


@dataclass
class ImportFileDone(Event):
    index: int
    path: str
    n_experts: int
    converted: int  # written by this run
    skipped: bool  # imported whole by an earlier run: not even loaded
    seconds: float


# --- distill -----------------------------------------------------------------------------
@dataclass
class DistillStarted(Event):
    run_dir: str
    start_iteration: int
    iterations: int
    layers: list[tuple[str, int]]  # (name, size)
    n_params: int
    n_images: int
    n_experts: int
    device: str
    memory: str
    prune_ratio: float
    prune_rule: str = ""  # scope/criterion/direction/mask/mode, e.g. global/abs/largest/step/loss
    keep_graphs: int = 0  # with memory "low": the last this many steps' graphs are kept (--keep-graphs)


@dataclass
class DistillIteration(Event):
    iteration: int  # 1-based count of finished iterations
    iterations: int
    loss: float
    lr: float
    start_epoch: int
    pruned: list[int]  # per layer, this iteration
    pruned_total: list[int]  # per layer, summed over the run so far
    iterations_pruned: int  # iterations that pruned anything, counted in pruned_total
    seconds: float


@dataclass
class CheckpointSaved(Event):
    iteration: int
    path: str


@dataclass
class DistillDone(Event):
    run_dir: str
    iteration: int
    loss: float
    lr: float
    seconds: float


# --- evaluate ----------------------------------------------------------------------------
@dataclass
class EvalStarted(Event):
    jobs: list[tuple[str, str, int, int | None]]  # (source, model, run index, checkpoint iteration or None)
    epochs: int
    device: str
    select: str | None = None  # val | final | test-max: how the distilled set's checkpoint is chosen


@dataclass
class EvalEpoch(Event):
    source: str
    model: str
    run: int
    epoch: int
    epochs: int
    loss: float
    iteration: int | None = None  # the checkpoint trained on
    trainings: int = 1  # trained together with this one (it first), one batched computation


@dataclass
class EvalRunDone(Event):
    source: str
    model: str
    run: int
    accuracy: float
    seconds: float
    diverged_epoch: int | None = None  # first epoch whose training loss was NaN/Inf
    iteration: int | None = None  # the checkpoint trained on
    val_accuracy: float | None = None  # on the validation split, when the run has one


@dataclass
class EvalDone(Event):
    results: list[dict]


# --- study -------------------------------------------------------------------------------
@dataclass
class StudyStarted(Event):
    out: str
    n_runs: int  # every (variant, seed) of the study
    todo: int  # those without a record yet (spread over ``ranks`` processes)
    ranks: int


@dataclass
class StudyRunDone(Event):
    record: dict  # as records.jsonl keeps it (``dpd_cli.recipes.study.run_batch``)
