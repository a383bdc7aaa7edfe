"""``dpd run CONFIG``: experts, distill, evaluate and the inspect summary from one config file.

Each step is the command of its name with the config's settings; a rerun continues what an earlier one left.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from dpd_cli import interrupt
from dpd_cli.cli.console import error_console, make_sink, print_json
from dpd_cli.cli.errors import handle_errors
from dpd_cli.cli.evaluate import report as evaluate_report
from dpd_cli.cli.inspect import show
from dpd_cli.cli.options import examples_help, keep_text
from dpd_cli.cli.runner import run_engine, set_host_memory
from dpd_cli.config.settings import resolve
from dpd_cli.errors import SettingsError

__all__ = ["run"]

SUMMARY = (
    "The whole pipeline from one config file: dpd experts, dpd distill, dpd evaluate RUN_DIR with the file's "
    "settings, then dpd inspect RUN_DIR.\n\n"
    "Every step's settings are checked before the first starts. Rerun it to continue after Ctrl-C or an error: "
    "finished experts are skipped, the distillation resumes from its last checkpoint (or is skipped when "
    "finished), the evaluation reuses its finished trainings (or is skipped when eval.json holds it)."
)
EXAMPLES = [
    ("dpd run examples/quick.toml", "the embedded dataset, with settings sized for a CPU"),
    ("dpd run examples/cifar10-ipc10.toml --device cuda --json", "MTT's CIFAR-10 IPC 10 on a GPU; the result as JSON"),
]
STEPS = ("experts", "distill", "evaluate")


class _Watch:
    """A progress sink that passes every event on and keeps the last of each kind."""

    def __init__(self, sink):
        self.sink, self.seen = sink, {}

    def emit(self, event) -> None:
        self.seen[type(event).__name__] = event
        self.sink.emit(event)

    def close(self) -> None:
        self.sink.close()


def run(
    config: Annotated[
        Path,
        typer.Argument(
            metavar="CONFIG",
            show_default=False,
            parser=keep_text,
            help=escape("Settings file (TOML, JSON or YAML) with [experts], [distill] and [evaluate] tables."),
        ),
    ],
    device: Annotated[
        str | None,
        typer.Option(
            "--device", metavar="NAME", show_default=False, help="--device of every step (auto, cpu, cuda, cuda:N)."
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", metavar="INT", show_default=False, help="--seed of every step.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No output (errors still go to stderr).")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print each step's output and the evaluation as JSON; no progress output.")
    ] = False,
) -> None:
    with handle_errors():
        if int(os.environ.get("WORLD_SIZE") or 1) > 1:  # the ranks would decide apart what to skip
            raise SettingsError("dpd run is one process: under torchrun run dpd experts, distill and evaluate instead.")
        settings = {c: resolve(c, {"device": device, "seed": seed}, config) for c in STEPS}
        from dpd_cli.artifacts.evaluation import partial_path, path_for  # torch: only now
        from dpd_cli.recipes.distill import existing
        from dpd_cli.recipes.evaluate import previous
        from dpd_cli.reports.inspect import inspect as inspect_run

        def step(command: str, s, *args):
            sink = _Watch(make_sink(command, quiet, json_out))
            try:
                return run_engine(command, s, *args, sink=sink), sink.seen
            except interrupt.Interrupted as e:
                stopped = e.resume_hint.split(";")[0]
                hint = f"{command}: {stopped}; rerun the same `dpd run` to continue (what was finished is kept)"
                raise interrupt.Interrupted(hint) from None

        set_host_memory(settings["experts"])
        folder, seen = step("experts", settings["experts"])
        todo = len(seen["ExpertsStarted"].indices)
        status = {"experts": "ran" if todo == settings["experts"].num else "resumed" if todo else "skipped"}
        d = settings["distill"]
        d = d.model_copy(update={"experts": d.experts or folder})  # the experts just trained, unless it names others
        run_dir, found = existing(d)
        status["distill"] = "ran" if d.force or found == "none" else "skipped" if found == "finished" else "resumed"
        if status["distill"] != "skipped":
            run_dir, _ = step("distill", d.model_copy(update={"resume": status["distill"] == "resumed"}))
        result = previous(settings["evaluate"], run_dir)
        status["evaluate"] = "skipped" if result else "resumed" if partial_path(path_for(run_dir)).exists() else "ran"
        if result is None:
            result, _ = step("evaluate", settings["evaluate"], run_dir)
        facts = inspect_run(run_dir)
    paths = {"experts": str(folder), "distill": str(run_dir), "evaluate": result["eval_file"]}
    shown = evaluate_report(settings["evaluate"], result)
    if json_out:
        steps = {c: {"path": paths[c], "status": status[c]} for c in STEPS}
        rest = {k: v for k, v in result.items() if k not in ("target", "eval_file")}
        print_json("run", {"config": str(config), **steps, **rest})
    elif not quiet:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(), grid.add_column(), grid.add_column(overflow="fold")
        for c in STEPS:
            grid.add_row(c, status[c], paths[c])
        con = show(facts)
        note = " (skipped: done by an earlier call with the same settings)" if "skipped" in status.values() else ""
        con.print(Text(f"\nSteps{note}", style="bold"), Padding(grid, (0, 0, 0, 2)), highlight=False)
    if shown.exit_code:
        error_console().print(shown.error, highlight=False)
        raise typer.Exit(shown.exit_code)


run.__doc__ = examples_help(SUMMARY, EXAMPLES, settings=False)
