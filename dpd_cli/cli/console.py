"""Consoles and progress views: Rich live views on a terminal, plain lines otherwise, nothing with --quiet.

Progress and diagnostics go to stderr; results to stdout.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter, deque
from functools import cache

from rich import progress as rp
from rich.console import Console, Group
from rich.live import Live
from rich.table import Column, Table
from rich.text import Text

from dpd_cli import __version__
from dpd_cli import events as ev
from dpd_cli.text import plural

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
    lo, span = min(vals), (max(vals) - min(vals)) or 1.0
    return "".join(_SPARK[round((v - lo) / span * (len(_SPARK) - 1))] for v in vals)


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
    """The whole job's time, estimated once from its first units of work (epochs, iterations).

    ``live``: the sentence stays on screen above the bars, so it leaves out the time left (the bars count it down).
    """

    def __init__(self, total_units: int, what: str, after: int = 1, live: bool = False):
        self.total, self.what, self.after, self.live = total_units, what, after, live
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
        left = "" if self.live else f"about {duration(per * (self.total - self.done))} left, "
        return f"Estimated time for the whole job: about {duration(per * self.total)} ({self.what}; {left}at {per:.3g} s each so far)."


def make_sink(kind: str, quiet: bool, json_mode: bool = False):
    """The progress sink for a command: Rich live view on a TTY, plain lines otherwise, none when quiet.

    Under torchrun only rank 0 shows progress.
    """
    if quiet or json_mode or os.environ.get("RANK", "0") != "0":
        return ev.NullSink()
    con = error_console()
    views = {
        "experts": _Experts,
        "experts_import": _Import,
        "distill": _Distill,
        "evaluate": _Evaluate,
        "study": _Study,
    }
    return views.get(kind, _View)(con, con.is_terminal and not con.is_dumb_terminal)


class _View:
    """One command's progress: Rich bars below the printed lines when ``interactive``, else plain lines."""

    live: Live | None = None

    def __init__(self, console: Console, interactive: bool):
        self.c, self.interactive = console, interactive

    def line(self, text: str) -> None:
        self.c.print(text, highlight=False, soft_wrap=True)

    def note(self, text: str | None) -> None:
        """A line between progress updates (above the bars on a terminal, where it wraps)."""
        if text:
            self.c.print(text, highlight=False, soft_wrap=not self.interactive)

    def emit(self, event: ev.Event) -> None:
        if isinstance(event, ev.Message):
            self.line(("Warning: " if event.level == "warning" else "") + event.text)
        else:
            self.handle(event)

    def handle(self, event: ev.Event) -> None:
        pass

    def bars(self, *extra: rp.ProgressColumn, eta: str = "") -> rp.Progress:
        """Each task's description, bar and count, the ``extra`` columns, the time spent and the time left."""
        return rp.Progress(
            rp.TextColumn("{task.description}"),
            rp.BarColumn(),
            rp.MofNCompleteColumn(),
            *extra,
            rp.TimeElapsedColumn(),
            *([rp.TextColumn(eta)] if eta else []),
            rp.TimeRemainingColumn(),
            console=self.c,
        )

    def show(self, renderable) -> None:
        self.live = Live(renderable, console=self.c, refresh_per_second=4)
        self.live.start()

    def close(self) -> None:
        if self.live:
            self.live.stop()
            self.live = None


class _Experts(_View):
    def handle(self, e: ev.Event) -> None:
        if isinstance(e, ev.ExpertsStarted):
            n = len(e.indices)
            what = f"{plural(n, 'expert')} × {plural(e.epochs, 'epoch')}"
            self.clock = _JobClock(n * e.epochs, what, live=self.interactive)
            if not self.interactive:
                self.line(
                    f"experts: {n} to train of {e.total} in {e.folder} ({plural(e.epochs, 'epoch')}, {e.n_params:,} parameters, {e.device})"
                )
                return
            self.line(
                f"Training {n} of {plural(e.total, 'expert')} into {e.folder} ({e.n_params:,} parameters, {e.device})"
            )
            self.progress, self.status = self.bars(), Text("")
            # Counted in epochs, so that the time left is the whole job's.
            self.t_experts = self.progress.add_task(plural(n, "expert"), total=n * e.epochs)
            self.t_epochs = self.progress.add_task("epochs ", total=e.epochs)
            self.show(Group(self.progress, self.status))
        elif isinstance(e, ev.ExpertSkipped):
            self.line(f"expert {e.index}: already finished, skipped")
        elif isinstance(e, ev.ExpertStarted) and self.live:
            self.progress.reset(self.t_epochs)
            more = f" +{e.trainings - 1}" if e.trainings > 1 else ""
            self.progress.update(self.t_epochs, description=f"expert {e.index}{more}")
        elif isinstance(e, ev.ExpertEpoch):
            if self.interactive:
                self.progress.update(self.t_epochs, completed=e.epoch)
                self.progress.advance(self.t_experts)
                self.status.plain = f"loss {e.train_loss:.4f}   train {e.train_acc:.1%}   test {e.test_acc:.1%}   {e.images_per_s:,.0f} img/s"
            else:
                self.line(
                    f"expert {e.index} epoch {e.epoch}/{e.epochs}: loss {e.train_loss:.4f} train {e.train_acc:.1%} test {e.test_acc:.1%} ({e.images_per_s:,.0f} img/s)"
                )
            self.note(self.clock.tick())
        elif isinstance(e, ev.ExpertDone):
            done = f"expert {e.index}: {'' if self.interactive else 'done, '}test accuracy {e.test_acc:.1%} ({e.seconds:.1f} s)"
            self.note(done if self.interactive else f"{done} -> {e.path}")


class _Import(_View):
    """A bar over the buffer files and one over the experts of the current file."""

    def handle(self, e: ev.Event) -> None:
        if isinstance(e, ev.ImportStarted):
            what = "Importing" if self.interactive else "experts import:"
            self.line(
                f"{what} {plural(len(e.files), 'buffer file')} into {e.folder} ({e.n_params:,} parameters per snapshot)"
            )
            if self.interactive:
                self.progress = self.bars()
                self.t_files = self.progress.add_task("files  ", total=len(e.files))
                self.t_experts = self.progress.add_task("experts", total=None)
                self.show(self.progress)
        elif isinstance(e, ev.ImportFileStarted):
            if self.interactive:
                self.progress.reset(self.t_experts, total=None, description=f"loading {e.path}")
            else:
                self.line(f"reading {e.path}")
        elif isinstance(e, ev.ImportExpert) and self.interactive:
            self.progress.update(self.t_experts, total=e.n_experts, completed=e.position + 1, description="experts")
        elif isinstance(e, ev.ImportFileDone):
            if self.interactive:
                self.progress.advance(self.t_files)
            if e.skipped:
                self.note(f"{e.path}: all {plural(e.n_experts, 'expert')} imported before, skipped")
            else:
                self.note(f"{e.path}: {e.converted} of {plural(e.n_experts, 'expert')} converted ({e.seconds:.1f} s)")


def _trend(losses: deque) -> str:
    if len(losses) < 4:
        return ""
    half = len(losses) // 2
    a = sum(list(losses)[:half]) / half
    b = sum(list(losses)[half:]) / (len(losses) - half)
    change = (b - a) / abs(a) if a else 0.0
    return "↓" if change < -0.01 else "↑" if change > 0.01 else "→"


class _Distill(_View):
    """A bar, the loss and the most pruned layers on a terminal; else about 20 lines per run, at least one every 30 s."""

    MAX_ROWS = 14

    def handle(self, e: ev.Event) -> None:
        if isinstance(e, ev.DistillStarted):
            self.s, self.losses, self.last, self.ckpt = e, deque(maxlen=50), None, ""
            self.t0, left = time.monotonic(), e.iterations - e.start_iteration
            self.clock = _JobClock(left, plural(left, "iteration"), min(3, max(1, left - 1)), self.interactive)
            self.rule = f" ({e.prune_rule})" if e.prune_ratio > 0 and e.prune_rule else ""
            self.kept = f" ({e.keep_graphs} graphs kept)" if e.keep_graphs else ""
            if self.interactive:
                self.progress = self.bars(rp.TaskProgressColumn(), rp.TextColumn("{task.fields[rate]}"), eta="ETA")
                self.task = self.progress.add_task("distill", total=e.iterations, completed=e.start_iteration, rate="")
                self.show(self.render())
            else:
                self.every = max(1, left // 20)
                what = "resuming at" if e.start_iteration else "starting"
                self.line(
                    f"distill: {what} iteration {e.start_iteration}/{e.iterations}, {e.n_images} images, {e.n_params:,} parameters, "
                    f"{plural(e.n_experts, 'expert')}, rho {e.prune_ratio:g}{self.rule}, memory {e.memory}{self.kept}, {e.device} -> {e.run_dir}"
                )
        elif isinstance(e, ev.DistillIteration):
            self.losses.append(e.loss)
            self.last = e
            self.note(self.clock.tick())
            now = time.monotonic()
            if self.interactive:
                rate = (e.iteration - self.s.start_iteration) / max(1e-9, now - self.t0)
                rate_text = f"{rate:.2f} it/s" if rate >= 1 else f"{1 / max(rate, 1e-9):.2f} s/it"
                self.progress.update(self.task, completed=e.iteration, rate=rate_text)
                if self.live:
                    self.live.update(self.render())
            elif e.iteration % self.every == 0 or e.iteration == e.iterations or now - self.t0 > 30:
                self.t0, total = now, sum(e.pruned)
                self.line(
                    f"iter {e.iteration}/{e.iterations}: loss {e.loss:.4f} (mean {sum(self.losses) / len(self.losses):.4f}) "
                    f"alpha {e.lr:.5g} start {e.start_epoch} pruned {total:,} ({total / self.s.n_params:.2%}) {e.seconds:.2f} s/it"
                )
        elif isinstance(e, ev.CheckpointSaved):
            self.ckpt = f"checkpoint @ {e.iteration}"
        elif isinstance(e, ev.DistillDone) and not self.interactive:
            self.line(f"distill: done, {plural(e.iteration, 'iteration')} in {e.seconds:.0f} s -> {e.run_dir}")
        elif isinstance(e, ev.DistillDone):
            self.close()
            self.line(
                f"Done: {plural(e.iteration, 'iteration')} in {e.seconds:.0f} s, final loss {e.loss:.4f}, alpha {e.lr:.5g} -> {e.run_dir}"
            )

    def render(self) -> Group:
        s, e = self.s, self.last
        if e is None:
            return Group(self.progress)
        mean = sum(self.losses) / len(self.losses)
        # Two short lines: one would wrap mid-phrase at 120 columns.
        status = Text.from_markup(
            f"loss [bold]{e.loss:.4f}[/]  mean(last {len(self.losses)}) {mean:.4f} {_trend(self.losses)}   "
            f"alpha {e.lr:.5g}   start epoch {e.start_epoch}   {self.ckpt}\n"
            f"rho {s.prune_ratio:g}{self.rule}   {s.memory} memory{self.kept}"
        )
        right = [Column(h, justify="right") for h in ("size", "pruned now", "%", "mean % so far")]
        table = Table("layer", *right, "", pad_edge=False, show_edge=False)
        rows = sorted(
            (
                (100 * total / (size * e.iterations_pruned) if e.iterations_pruned else 0.0, name, size, now)
                for (name, size), now, total in zip(s.layers, e.pruned, e.pruned_total, strict=True)
            ),
            key=lambda r: -r[0],
        )
        top = max((r[0] for r in rows), default=0.0) or 1.0
        for rank, (mean_pct, name, size, now) in enumerate(rows[: self.MAX_ROWS]):
            style = "bold red" if rank < 3 and mean_pct > 0 else ""
            bar = "█" * round(12 * mean_pct / top) if mean_pct > 0 else ""
            row = (f"{size:,}", f"{now:,}", f"{100 * now / size:.1f}", f"{mean_pct:.2f}")
            table.add_row(Text(name, style=style), *row, Text(bar, style="red"))
        if len(rows) > self.MAX_ROWS:
            table.add_row(f"... {len(rows) - self.MAX_ROWS} more layers", "", "", "", "", "")
        return Group(self.progress, status, table)


def _set_name(source: str, iteration: int | None, several: bool) -> str:
    """``distilled``, or ``checkpoint 300`` when the run's checkpoints are compared."""
    if source == "distilled" and several and iteration is not None:
        return f"checkpoint {iteration}"
    return source


class _Evaluate(_View):
    """An overall bar, one line per set (each checkpoint of the run, each baseline), and the current training's epochs."""

    several = False

    def handle(self, e: ev.Event) -> None:
        if isinstance(e, ev.EvalStarted):
            self.several = len({j[3] for j in e.jobs if j[0] == "distilled"}) > 1
            if not self.interactive:
                how = f", choosing the checkpoint by {e.select}" if self.several and e.select else ""
                self.line(
                    f"evaluate: {plural(len(e.jobs), 'training')} of {plural(e.epochs, 'epoch')} on {e.device}{how}"
                )
                return
            self.progress = self.bars(rp.TextColumn("{task.fields[acc]}"))
            self.t_runs = self.progress.add_task("all trainings", total=len(e.jobs), acc="")
            sets = Counter((source, it) for source, _, _, it in e.jobs)
            self.sets = {
                (source, it): self.progress.add_task(f"  {_set_name(source, it, self.several)}", total=n, acc="")
                for (source, it), n in sets.items()
            }
            self.accs: dict = {}
            self.t_epochs = self.progress.add_task("epochs   ", total=e.epochs, acc="")
            self.show(self.progress)
        elif isinstance(e, ev.EvalEpoch) and self.interactive:
            name = _set_name(e.source, e.iteration, self.several)
            more = f" +{e.trainings - 1}" if e.trainings > 1 else ""
            self.progress.update(
                self.t_epochs, completed=e.epoch, total=e.epochs, description=f"{name}/{e.model} #{e.run}{more}"
            )
        elif isinstance(e, ev.EvalRunDone):
            val = f" (validation {e.val_accuracy:.2%})" if e.val_accuracy is not None else ""
            diverged = f", diverged: training loss NaN/Inf from epoch {e.diverged_epoch}" if e.diverged_epoch else ""
            name = f"{_set_name(e.source, e.iteration, self.several)} / {e.model} run {e.run}"
            if not self.interactive:
                self.line(f"{name}: test accuracy {e.accuracy:.2%}{val} ({e.seconds:.0f} s){diverged}")
                return
            self.progress.advance(self.t_runs)
            key = (e.source, e.iteration)
            accs = self.accs.setdefault(key, [])
            accs.append((e.accuracy, e.val_accuracy))
            vals = [v for _, v in accs if v is not None]
            mean_val = f"  val {sum(vals) / len(vals):.2%}" if vals else ""
            text = f"test {sum(a for a, _ in accs) / len(accs):.2%}{mean_val}"
            if key in self.sets:
                self.progress.update(self.sets[key], advance=1, acc=text)
            self.note(f"{name}: {e.accuracy:.2%}{val}{diverged}")
        elif isinstance(e, ev.EvalDone):
            self.close()


class _Study(_View):
    """A bar over the runs on a terminal, and one line per finished run."""

    def handle(self, e: ev.Event) -> None:
        if isinstance(e, ev.StudyStarted):
            ranks = f", spread over {e.ranks} processes" if e.ranks > 1 else ""
            self.line(f"study: {e.todo} of {e.n_runs} runs to do{ranks} -> {e.out}")
            self.clock = _JobClock(e.todo, f"{e.todo} runs")
            if self.interactive:
                self.progress = self.bars()
                self.task = self.progress.add_task("runs", total=e.todo)
                self.show(self.progress)
        elif isinstance(e, ev.StudyRunDone):
            r = e.record
            name = f"{r['variant']} s{r['seed']}"
            if "diverged" in r:
                text = f"{name}: diverged ({r['diverged'][:120]})"
            else:
                text = (
                    f"{name}: val-selected {100 * r['selected']:.2f} % (iteration {r['selected_iteration']}), final "
                    f"{100 * r['final']:.2f} %, test-max {100 * r['test_max']:.2f} % "
                    f"[{r['distill_s']:.0f} + {r['evaluate_s']:.0f} s]"
                )
            if self.interactive:
                self.progress.advance(self.task)
            self.note(text)
            self.note(self.clock.tick())
