"""The one sequence every settings command runs: resolve -> sink -> engine -> close -> report.

``settings_command`` builds a Typer command function for ``experts``, ``distill`` or ``evaluate``
from three things its module supplies: the engine call, the report of its result, and the help
text. The options come from the settings model (``dpd_cli.cli.options``).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import typer

from dpd_cli.cli.console import make_sink
from dpd_cli.cli.errors import handle_errors
from dpd_cli.cli.options import COMMON, common_parameters, examples_help, settings_parameters

__all__ = ["Output", "settings_command"]


@dataclass(frozen=True)
class Output:
    """How the result is shown: ``json`` prints it as JSON on stdout; ``quiet`` prints nothing."""

    quiet: bool
    json: bool


#: ``run(settings, sink, **arguments) -> result``: the command's one engine entry point.
Run = Callable[..., Any]
#: ``report(settings, result, output) -> exit code``: prints the result; 0 for success.
Report = Callable[[Any, Any, Output], int]


def settings_command(command: str, *, run: Run, report: Report, summary: str, examples: list[tuple[str, str]],
                     arguments: Sequence[inspect.Parameter] = ()) -> Callable[..., None]:
    """A Typer command function whose options are the settings of ``command``.

    Args:
        command: ``experts``, ``distill`` or ``evaluate`` (a key of ``COMMAND_SETTINGS``).
        run: Calls the engine; gets the settings, the progress sink and the ``arguments`` by name.
        report: Prints the result (honouring ``--quiet``/``--json``) and returns the exit code.
        summary: The first paragraph of ``--help``.
        examples: ``(command line, what it does)`` pairs shown under the summary.
        arguments: Positional arguments (``typer.Argument`` parameters) passed on to ``run``.
    """
    names = [p.name for p in arguments]

    def command_function(**values: Any) -> None:
        args = {n: values.pop(n) for n in names}
        config, print_config, quiet, json_out = (values.pop(n) for n in COMMON)
        code = 0
        with handle_errors():
            from dpd_cli.settings import resolve_sources, to_toml

            resolved = resolve_sources(command, values, config)  # values: exactly the settings flags
            if print_config:
                sys.stdout.write(to_toml(resolved))
                return
            sink = make_sink(command, quiet, json_out)
            try:
                result = run(resolved.settings, sink, **args)
            finally:
                sink.close()
            code = report(resolved.settings, result, Output(quiet, json_out))
        if code:
            raise typer.Exit(code)

    command_function.__name__ = command
    command_function.__doc__ = examples_help(summary, examples)
    command_function.__signature__ = inspect.Signature([*arguments, *settings_parameters(command), *common_parameters()])
    return command_function
