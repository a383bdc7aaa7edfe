"""``dpd evaluate``: honest test accuracy of a synthetic set, with baselines."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from dpd_cli.cli.console import error_console, out_console, print_json
from dpd_cli.cli.results import divergence_note, results_table
from dpd_cli.cli.options import keep_text
from dpd_cli.cli.runner import Output, settings_command
from dpd_cli.errors import EXIT_BELOW_THRESHOLD


def _run(settings, sink, target: str):
    from dpd_cli.engine import evaluate as engine

    return engine.run(settings, target, sink)  # as typed: the engine refuses an empty target


def _report(settings, result: dict, output: Output) -> int:
    if not result["results"]:
        return 0  # a non-zero torchrun rank: rank 0 reports
    if output.json:
        print_json(result)
    elif not output.quiet:
        con = out_console()
        first = result["results"][0]
        con.print(Text(f"Test accuracy (%) on {first['dataset']}, IPC {first['ipc']}: mean ± std (runs)", style="bold"))
        con.print(results_table(result["results"]))
        note = divergence_note(result["results"])
        if note:
            con.print(Text(note, style="dim"))
        con.print(f"Saved to {result['eval_file']}", highlight=False)
    if result["passed"]:
        return 0
    worst = min(result["below"], key=lambda r: r["mean"])
    error_console().print(
        f"Accuracy below threshold: {worst['model']} reached {100 * worst['mean']:.2f}% < --fail-under {result['fail_under']:g}%.",
        highlight=False,
    )
    return EXIT_BELOW_THRESHOLD


_TARGET = inspect.Parameter("target", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[Path, typer.Argument(
    metavar="TARGET", show_default=False, parser=keep_text,
    help="A run directory from `dpd distill`, its synthetic.safetensors, or a checkpoint.")])

evaluate = settings_command(
    "evaluate", run=_run, report=_report, arguments=[_TARGET],
    summary="Train fresh networks on a synthetic set and report real test accuracy (mean ± std over runs).\n\n"
            "Exit code 3 when --fail-under is given and a distilled mean accuracy is below it.",
    examples=[
        ("dpd evaluate runs/quick --config examples/quick.toml", "the quick preset's run, with its evaluation settings"),
        ("dpd evaluate runs/cifar10-ipc10 --baseline random,full", "MTT protocol, with both baselines"),
        ("dpd evaluate runs/x --models convnet,resnet18 --fail-under 60", "two architectures; exit 3 below 60 %"),
    ],
)
