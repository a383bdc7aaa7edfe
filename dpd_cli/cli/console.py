"""Consoles and progress views: Rich live views on a terminal, plain lines otherwise, nothing with --quiet.

Progress and diagnostics go to stderr; results to stdout.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from functools import cache

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from dpd_cli import __version__
from dpd_cli.events import (
    CheckpointSaved,
    DistillDone,
    DistillIteration,
    DistillStarted,
    EvalDone,
    EvalEpoch,
    EvalRunDone,
    EvalStarted,
    Event,
    ExpertDone,
    ExpertEpoch,
    ExpertSkipped,
    ExpertsStarted,
    ExpertStarted,
    ImportExpert,
    ImportFileDone,
    ImportFileStarted,
    ImportStarted,
    Message,
    NullSink,
)

__all__ = [
    "JSON_SCHEMA",
    "error_console",
    "out_console",
    "make_sink",
    "json_envelope",
    "print_json",
    "print_result",
    "sparkline",
]

_SPARK = "▁▂▃▄▅▆▇█"


@cache
def error_console() -> Console:
    return Console(stderr=True)


@cache
def out_console() -> Console:
    return Console()


#: The version of the layout of every command's ``--json`` output (docs/formats.md, "JSON output"):
#: raised when a key is removed or changes meaning; new keys may appear without it.
JSON_SCHEMA = 1
_ENVELOPE = ("command", "dpd_version", "schema")


def json_envelope(command: str, payload: dict) -> dict:
    """``{"command", "dpd_version", "schema", **payload}``: what every command prints with ``--json``.

    ``command`` is the command as typed: a settings name such as ``experts_import`` becomes ``experts import``.
    """
    clash = set(_ENVELOPE) & payload.keys()
    if clash:
        raise ValueError(f"the {command} result uses the envelope's keys {sorted(clash)}")
    return {"command": command.replace("_", " "), "dpd_version": __version__, "schema": JSON_SCHEMA, **payload}


def print_json(command: str, payload: dict) -> None:
    """Print ``payload`` in the JSON envelope on stdout."""
    sys.stdout.write(json.dumps(json_envelope(command, payload), indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_result(command: str, result: dict, json_out: bool, lines: list[str]) -> None:
    """A command's result on stdout: ``result`` in the JSON envelope with ``--json``, else ``lines`` (unwrapped)."""
    if json_out:
        print_json(command, result)
        return
    for line in lines:
        out_console().print(line, highlight=False, soft_wrap=True, markup=False)


def sparkline(values: list[float], width: int = 40) -> str:
    """Unicode sparkline of ``values``, averaged down to at most ``width`` points."""
    vals = [v for v in values if math.isfinite(v)]
    if len(vals) > width:
        chunks = [vals[i * len(vals) // width : (i + 1) * len(vals) // width] for i in range(width)]
        vals = [sum(c) / len(c) for c in chunks if c]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(_SPARK[round((v - lo) / span * (len(_SPARK) - 1))] for v in vals)


def make_sink(kind: str, quiet: bool, json_mode: bool = False):
    """The progress sink for a command: Rich live view on a TTY, plain lines otherwise, none when quiet.

    Under torchrun only rank 0 shows progress.
    """
    if quiet or json_mode or os.environ.get("RANK", "0") != "0":
        return NullSink()
    con = error_console()
    interactive = con.is_terminal and not con.is_dumb_terminal
    views = {
        "experts": (ExpertsLive, ExpertsPlain),
        "experts_import": (ImportLive, ImportPlain),
        "distill": (DistillLive, DistillPlain),
        "evaluate": (EvalLive, EvalPlain),
        "export": (_Plain, _Plain),
    }
    live_cls, plain_cls = views[kind]
    return live_cls(con) if interactive else plain_cls(con)


class _Plain:
    def __init__(self, console: Console):
        self.c = console

    def line(self, text: str) -> None:
        self.c.print(text, highlight=False, soft_wrap=True)

    def emit(self, event: Event) -> None:
        if isinstance(event, Message):
            self.line(("Warning: " if event.level == "warning" else "") + event.text)
            return
        self.handle(event)

    def handle(self, event: Event) -> None:  # pragma: no cover - overridden
        pass

    def close(self) -> None:
        pass


# --- experts --------------------------------------------------------------------------------
def duration(seconds: float) -> str:
    """``40 s``, ``25 min``, ``3.5 h``, ``2.1 days``: how long, to the precision an estimate deserves."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class _JobClock:
    """The whole job's time, estimated once from its first units of work (epochs, iterations)."""

    def __init__(self, total_units: int, what: str, after: int = 1):
        self.total, self.what, self.after = total_units, what, after
        self.done = 0
        self.t0 = time.monotonic()
        self.told = False

    def tick(self) -> str | None:
        """Count one unit; the estimate sentence once ``after`` units are done (then ``None``)."""
        self.done += 1
        if self.told or self.done < self.after or self.total <= self.done:
            return None
        self.told = True
        per = (time.monotonic() - self.t0) / self.done
        return (
            f"Estimated time for the whole job: about {duration(per * self.total)} ({self.what}; about "
            f"{duration(per * (self.total - self.done))} left, at {per:.3g} s each so far)."
        )


class ExpertsPlain(_Plain):
    def handle(self, e: Event) -> None:
        if isinstance(e, ExpertsStarted):
            self.clock = _JobClock(len(e.indices) * e.epochs, f"{len(e.indices)} experts × {e.epochs} epochs")
            self.line(
                f"experts: {len(e.indices)} to train of {e.total} in {e.folder} ({e.epochs} epochs, {e.n_params:,} parameters, {e.device})"
            )
        elif isinstance(e, ExpertSkipped):
            self.line(f"expert {e.index}: already finished, skipped")
        elif isinstance(e, ExpertEpoch):
            self.line(
                f"expert {e.index} epoch {e.epoch}/{e.epochs}: loss {e.train_loss:.4f} train {e.train_acc:.1%} test {e.test_acc:.1%} ({e.images_per_s:,.0f} img/s)"
            )
            note = self.clock.tick()
            if note:
                self.line(note)
        elif isinstance(e, ExpertDone):
            self.line(f"expert {e.index}: done, test accuracy {e.test_acc:.1%} ({e.seconds:.1f} s) -> {e.path}")


class ExpertsLive(_Plain):
    def __init__(self, console: Console):
        super().__init__(console)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.live: Live | None = None
        self.status = Text("")
        self.t_experts = self.t_epochs = None

    def handle(self, e: Event) -> None:
        if isinstance(e, ExpertsStarted):
            self.line(
                f"Training {len(e.indices)} of {e.total} experts into {e.folder} ({e.n_params:,} parameters, {e.device})"
            )
            self.clock = _JobClock(len(e.indices) * e.epochs, f"{len(e.indices)} experts × {e.epochs} epochs")
            # Counted in epochs, so that the time left is the whole job's.
            self.t_experts = self.progress.add_task(f"{len(e.indices)} experts", total=len(e.indices) * e.epochs)
            self.t_epochs = self.progress.add_task("epochs ", total=e.epochs)
            self.live = Live(Group(self.progress, self.status), console=self.c, refresh_per_second=4, transient=False)
            self.live.start()
        elif isinstance(e, ExpertSkipped):
            self.line(f"expert {e.index}: already finished, skipped")
        elif isinstance(e, ExpertStarted) and self.t_epochs is not None:
            self.progress.reset(self.t_epochs)
            self.progress.update(self.t_epochs, description=f"expert {e.index}")
        elif isinstance(e, ExpertEpoch):
            self.progress.update(self.t_epochs, completed=e.epoch)
            self.progress.advance(self.t_experts)
            self.status.plain = f"loss {e.train_loss:.4f}   train {e.train_acc:.1%}   test {e.test_acc:.1%}   {e.images_per_s:,.0f} img/s"
            note = self.clock.tick()
            if note:
                self.c.print(note, highlight=False)
        elif isinstance(e, ExpertDone):
            self.c.print(f"expert {e.index}: test accuracy {e.test_acc:.1%} ({e.seconds:.1f} s)", highlight=False)

    def close(self) -> None:
        if self.live:
            self.live.stop()


# --- experts import -------------------------------------------------------------------------
def _file_line(e: ImportFileDone) -> str:
    if e.skipped:
        return f"{e.path}: all {e.n_experts} experts imported before, skipped"
    return f"{e.path}: {e.converted} of {e.n_experts} experts converted ({e.seconds:.1f} s)"


class ImportPlain(_Plain):
    def handle(self, e: Event) -> None:
        if isinstance(e, ImportStarted):
            self.line(
                f"experts import: {len(e.files)} buffer file(s) into {e.folder} ({e.n_params:,} parameters per snapshot)"
            )
        elif isinstance(e, ImportFileStarted):
            self.line(f"reading {e.path}")
        elif isinstance(e, ImportFileDone):
            self.line(_file_line(e))


class ImportLive(_Plain):
    """A bar over the buffer files and one over the experts of the current file."""

    def __init__(self, console: Console):
        super().__init__(console)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.live: Live | None = None

    def handle(self, e: Event) -> None:
        if isinstance(e, ImportStarted):
            self.line(
                f"Importing {len(e.files)} buffer file(s) into {e.folder} ({e.n_params:,} parameters per snapshot)"
            )
            self.t_files = self.progress.add_task("files  ", total=len(e.files))
            self.t_experts = self.progress.add_task("experts", total=None)
            self.live = Live(self.progress, console=self.c, refresh_per_second=4, transient=False)
            self.live.start()
        elif isinstance(e, ImportFileStarted):
            self.progress.reset(self.t_experts, total=None, description=f"loading {e.path}")
        elif isinstance(e, ImportExpert):
            self.progress.update(self.t_experts, total=e.n_experts, completed=e.position + 1, description="experts")
        elif isinstance(e, ImportFileDone):
            self.progress.advance(self.t_files)
            self.c.print(_file_line(e), highlight=False)

    def close(self) -> None:
        if self.live:
            self.live.stop()
            self.live = None


# --- distill --------------------------------------------------------------------------------
def _trend(losses: deque) -> str:
    if len(losses) < 4:
        return ""
    half = len(losses) // 2
    a = sum(list(losses)[:half]) / half
    b = sum(list(losses)[half:]) / (len(losses) - half)
    change = (b - a) / abs(a) if a else 0.0
    return "↓" if change < -0.01 else "↑" if change > 0.01 else "→"


class DistillPlain(_Plain):
    """Periodic lines: about 20 per run, and at least one every 30 s."""

    def handle(self, e: Event) -> None:
        if isinstance(e, DistillStarted):
            self.start = e
            self.every = max(1, (e.iterations - e.start_iteration) // 20)
            self.t_last = time.monotonic()
            self.losses: deque = deque(maxlen=50)
            what = "resuming at" if e.start_iteration else "starting"
            left = e.iterations - e.start_iteration
            self.clock = _JobClock(left, f"{left} iterations", after=min(3, max(1, left - 1)))
            self.line(
                f"distill: {what} iteration {e.start_iteration}/{e.iterations}, {e.n_images} images, {e.n_params:,} parameters, "
                f"{e.n_experts} experts, rho {e.prune_ratio:g}"
                + (f" ({e.prune_rule})" if e.prune_ratio > 0 and e.prune_rule else "")
                + f", memory {e.memory}"
                + (f" ({e.keep_graphs} graphs kept)" if e.keep_graphs else "")
                + f", {e.device} -> {e.run_dir}"
            )
        elif isinstance(e, DistillIteration):
            self.losses.append(e.loss)
            note = self.clock.tick()
            if note:
                self.line(note)
            now = time.monotonic()
            if e.iteration % self.every == 0 or e.iteration == e.iterations or now - self.t_last > 30:
                self.t_last = now
                total = sum(e.pruned)
                self.line(
                    f"iter {e.iteration}/{e.iterations}: loss {e.loss:.4f} (mean {sum(self.losses) / len(self.losses):.4f}) "
                    f"alpha {e.lr:.5g} start {e.start_epoch} pruned {total:,} ({total / self.start.n_params:.2%}) {e.seconds:.2f} s/it"
                )
        elif isinstance(e, DistillDone):
            self.line(f"distill: done, {e.iteration} iterations in {e.seconds:.0f} s -> {e.run_dir}")


class DistillLive(_Plain):
    MAX_ROWS = 14

    def __init__(self, console: Console):
        super().__init__(console)
        self.progress = Progress(
            TextColumn("distill"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.live: Live | None = None
        self.losses: deque = deque(maxlen=50)
        self.last: DistillIteration | None = None
        self.ckpt = ""

    def handle(self, e: Event) -> None:
        if isinstance(e, DistillStarted):
            self.start = e
            self.task = self.progress.add_task("distill", total=e.iterations, completed=e.start_iteration, rate="")
            self.t0, self.i0 = time.monotonic(), e.start_iteration
            left = e.iterations - e.start_iteration
            self.clock = _JobClock(left, f"{left} iterations", after=min(3, max(1, left - 1)))
            self.live = Live(self.render(), console=self.c, refresh_per_second=4)
            self.live.start()
        elif isinstance(e, DistillIteration):
            self.losses.append(e.loss)
            self.last = e
            note = self.clock.tick()
            if note:
                self.c.print(note, highlight=False)
            rate = (e.iteration - self.i0) / max(1e-9, time.monotonic() - self.t0)
            self.progress.update(
                self.task,
                completed=e.iteration,
                rate=f"{rate:.2f} it/s" if rate >= 1 else f"{1 / max(rate, 1e-9):.2f} s/it",
            )
            if self.live:
                self.live.update(self.render())
        elif isinstance(e, CheckpointSaved):
            self.ckpt = f"checkpoint @ {e.iteration}"
        elif isinstance(e, DistillDone):
            self.close()
            self.line(
                f"Done: {e.iteration} iterations in {e.seconds:.0f} s, final loss {e.loss:.4f}, alpha {e.lr:.5g} -> {e.run_dir}"
            )

    def render(self):
        s = self.start
        parts = [self.progress]
        e = self.last
        if e is not None:
            mean = sum(self.losses) / len(self.losses)
            parts.append(
                Text.from_markup(
                    f"loss [bold]{e.loss:.4f}[/]  mean(last {len(self.losses)}) {mean:.4f} {_trend(self.losses)}   "
                    f"alpha {e.lr:.5g}   start epoch {e.start_epoch}   rho {s.prune_ratio:g}"
                    + (f" ({s.prune_rule})" if s.prune_ratio > 0 and s.prune_rule else "")
                    + f"   {s.memory} memory"
                    + (f" ({s.keep_graphs} graphs kept)" if s.keep_graphs else "")
                    + f"   {self.ckpt}"
                )
            )
            table = Table(title=None, expand=False, pad_edge=False, show_edge=False)
            table.add_column("layer")
            table.add_column("size", justify="right")
            table.add_column("pruned now", justify="right")
            table.add_column("%", justify="right")
            table.add_column("mean % so far", justify="right")
            table.add_column("")
            rows = []
            for (name, size), now, total in zip(s.layers, e.pruned, e.pruned_total, strict=True):
                mean_pct = 100 * total / (size * e.iterations_pruned) if e.iterations_pruned else 0.0
                rows.append((mean_pct, name, size, now))
            rows.sort(key=lambda r: -r[0])
            top = max((r[0] for r in rows), default=0.0) or 1.0
            for rank, (mean_pct, name, size, now) in enumerate(rows[: self.MAX_ROWS]):
                style = "bold red" if rank < 3 and mean_pct > 0 else ""
                bar = "█" * int(round(12 * mean_pct / top)) if mean_pct > 0 else ""
                table.add_row(
                    Text(name, style=style),
                    f"{size:,}",
                    f"{now:,}",
                    f"{100 * now / size:.1f}",
                    f"{mean_pct:.2f}",
                    Text(bar, style="red"),
                )
            if len(rows) > self.MAX_ROWS:
                table.add_row(f"... {len(rows) - self.MAX_ROWS} more layers", "", "", "", "", "")
            parts.append(table)
        return Group(*parts)

    def close(self) -> None:
        if self.live:
            self.live.stop()
            self.live = None


# --- evaluate -------------------------------------------------------------------------------
def _set_name(source: str, iteration: int | None, several: bool) -> str:
    """``distilled``, or ``checkpoint 300`` when the run's checkpoints are compared."""
    if source == "distilled" and several and iteration is not None:
        return f"checkpoint {iteration}"
    return source


def _val(e: EvalRunDone) -> str:
    return f" (validation {e.val_accuracy:.2%})" if e.val_accuracy is not None else ""


class EvalPlain(_Plain):
    def handle(self, e: Event) -> None:
        if isinstance(e, EvalStarted):
            self.several = len({j[3] for j in e.jobs if j[0] == "distilled"}) > 1
            how = f", choosing the checkpoint by {e.select}" if self.several and e.select else ""
            self.line(f"evaluate: {len(e.jobs)} trainings of {e.epochs} epochs on {e.device}{how}")
        elif isinstance(e, EvalRunDone):
            name = _set_name(e.source, e.iteration, getattr(self, "several", False))
            self.line(
                f"{name} / {e.model} run {e.run}: test accuracy {e.accuracy:.2%}{_val(e)} ({e.seconds:.0f} s){_diverged(e)}"
            )


def _diverged(e: EvalRunDone) -> str:
    return f", diverged: training loss NaN/Inf from epoch {e.diverged_epoch}" if e.diverged_epoch else ""


class EvalLive(_Plain):
    """An overall bar, one line per set (each checkpoint of the run, each baseline), and the current training's epochs."""

    def __init__(self, console: Console):
        super().__init__(console)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[acc]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.live: Live | None = None
        self.sets: dict = {}
        self.accs: dict = {}

    def handle(self, e: Event) -> None:
        if isinstance(e, EvalStarted):
            self.several = len({j[3] for j in e.jobs if j[0] == "distilled"}) > 1
            self.t_runs = self.progress.add_task("all trainings", total=len(e.jobs), acc="")
            for source, _, _, it in e.jobs:
                key = (source, it)
                if key not in self.sets:
                    self.sets[key] = self.progress.add_task(f"  {_set_name(source, it, self.several)}", total=0, acc="")
                self.progress.update(self.sets[key], total=self.progress.tasks[self.sets[key]].total + 1)
            self.t_epochs = self.progress.add_task("epochs   ", total=e.epochs, acc="")
            self.live = Live(self.progress, console=self.c, refresh_per_second=4)
            self.live.start()
        elif isinstance(e, EvalEpoch):
            name = _set_name(e.source, e.iteration, self.several)
            self.progress.update(
                self.t_epochs, completed=e.epoch, total=e.epochs, description=f"{name}/{e.model} #{e.run}"
            )
        elif isinstance(e, EvalRunDone):
            self.progress.advance(self.t_runs)
            key = (e.source, e.iteration)
            self.accs.setdefault(key, []).append((e.accuracy, e.val_accuracy))
            accs = self.accs[key]
            mean = sum(a for a, _ in accs) / len(accs)
            vals = [v for _, v in accs if v is not None]
            text = f"test {mean:.2%}" + (f"  val {sum(vals) / len(vals):.2%}" if vals else "")
            if key in self.sets:
                self.progress.update(self.sets[key], advance=1, acc=text)
            self.c.print(
                f"{_set_name(e.source, e.iteration, self.several)} / {e.model} run {e.run}: {e.accuracy:.2%}{_val(e)}"
                f"{_diverged(e)}",
                highlight=False,
            )
        elif isinstance(e, EvalDone):
            self.close()

    def close(self) -> None:
        if self.live:
            self.live.stop()
            self.live = None
