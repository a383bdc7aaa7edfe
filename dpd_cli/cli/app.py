"""The ``dpd`` command: one Typer app, one module per command."""

from __future__ import annotations

from typing import Annotated

import typer

from dpd_cli import __version__
from dpd_cli.cli.compare import compare
from dpd_cli.cli.distill import distill
from dpd_cli.cli.evaluate import evaluate
from dpd_cli.cli.experts import experts_app
from dpd_cli.cli.export import export
from dpd_cli.cli.inspect import inspect
from dpd_cli.cli.ls import ls
from dpd_cli.cli.options import ENVIRONMENT_HELP, Command, Group
from dpd_cli.cli.run import run
from dpd_cli.cli.study import study


class _Root(Group):
    """The ``dpd`` group: its commands listed in the order they are used."""

    ORDER = ("run", "experts", "distill", "evaluate", "inspect", "export", "study")

    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: self.ORDER.index(n) if n in self.ORDER else len(self.ORDER))


app = typer.Typer(
    name="dpd",
    help="Dataset distillation by trajectory matching with Difference-Driven Pruning.\n\n"
    "Typical use: dpd run CONFIG, which runs dpd experts -> dpd distill -> dpd evaluate RUN_DIR -> dpd inspect RUN_DIR "
    "with the config file's settings (each can be run alone); dpd ls lists runs, dpd compare RUN... sets their "
    "evaluations side by side, and dpd study CONFIG runs a paired comparison over seeds. With MTT's tools: "
    "dpd experts import BUFFERS..., dpd export RUN_DIR --format mtt.\n\n"
    "Exit codes: 0 ok, 2 user error, 3 accuracy below --fail-under (or no gain with --fail-if-no-gain), "
    "130 interrupted; anything else is a bug.",
    epilog=ENVIRONMENT_HELP,
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion
    pretty_exceptions_enable=False,
    cls=_Root,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dpd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    pass


app.add_typer(experts_app, name="experts")
for command in (run, distill, evaluate, export, study):
    app.command(cls=Command, epilog=ENVIRONMENT_HELP)(command)
for command in (inspect, ls, compare):  # no settings: no DPD_<COMMAND>_X variables to mention
    app.command(cls=Command)(command)


def main() -> None:
    app(prog_name="dpd")
