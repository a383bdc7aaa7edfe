"""The one sequence every settings command runs: resolve -> sink -> engine -> close -> report.

``dpd distill`` calls ``dpd_cli.recipes.distill.run``; its options come from the settings model, and
the command's module supplies only how its result is reported and its help text.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import typer
from rich.console import RenderableType

from dpd_cli.cli.console import error_console, make_sink, out_console, print_json
from dpd_cli.cli.errors import handle_errors
from dpd_cli.cli.options import common_parameters, examples_help, settings_parameters
from dpd_cli.config.settings import Resolved, resolve_sources, to_toml


@dataclass
class Report:
    """What a command prints once its engine call returned."""

    json: Any  # printed with --json (None: nothing, e.g. on a non-zero torchrun rank)
    text: list[RenderableType | str] = field(default_factory=list)  # printed otherwise, unless --quiet
    exit_code: int = 0  # or EXIT_BELOW_THRESHOLD
    error: str | None = None  # printed on stderr in every mode when exit_code is not 0


def settings_command(
    command: str,
    *,
    report: Callable[[Any, Any], Report],
    summary: str,
    examples: list[tuple[str, str]],
    arguments: Sequence[inspect.Parameter] = (),
    complete: Callable[[Resolved], Resolved] | None = None,
) -> Callable[..., None]:
    """A Typer command function whose options are the settings of ``command``.

    ``report(settings, result of run) -> Report``; ``examples``: ``(command line, what it does)`` pairs
    under the ``summary`` in ``--help``; ``arguments``: positional parameters, passed on in this order
    to the engine's ``run(settings, *arguments, sink)``; ``complete``: what ``--print-config`` prints instead
    of the resolved settings when the engine completes them before it runs (their values and sources).
    """

    common = common_parameters()

    def command_function(**values: Any) -> None:
        args = [values.pop(p.name) for p in arguments]
        config, print_config, quiet, json_out = (values.pop(p.name) for p in common)
        with handle_errors():
            resolved = resolve_sources(command, values, config)  # values: exactly the settings flags
            if print_config:
                sys.stdout.write(to_toml(complete(resolved) if complete else resolved))
                return
            set_host_memory(resolved.settings)
            result = run_engine(command, resolved.settings, *args, sink=make_sink(command, quiet, json_out))
            shown = report(resolved.settings, result)
        rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun rank 0 reports
        if rank0 and json_out and shown.json is not None:
            print_json(command, shown.json)
        elif rank0 and not json_out and not quiet:
            for item in shown.text:
                out_console().print(item, highlight=False, soft_wrap=isinstance(item, str))
        if shown.exit_code:
            if shown.error:
                error_console().print(shown.error, highlight=False)
            raise typer.Exit(shown.exit_code)

    command_function.__name__ = command
    command_function.__doc__ = examples_help(summary, examples)
    params = [*arguments, *settings_parameters(command), *common]
    command_function.__signature__ = inspect.Signature(params)
    return command_function


def run_engine(command: str, settings: Any, *args: Any, sink: Any) -> Any:
    """``dpd_cli.recipes.<command>.run(settings, *args, sink)``, closing ``sink`` afterwards."""
    engine = importlib.import_module(f"dpd_cli.recipes.{command}")  # torch: only now, not for --help
    try:
        return engine.run(settings, *args, sink)
    finally:
        sink.close()


def set_host_memory(settings: Any) -> None:
    """``--host-memory`` sets glibc's allocator for the whole process, so the command sets it, once, first."""
    if hasattr(settings, "host_memory"):
        from dpd_cli.recipes.runtime import resolve_device, set_host_memory  # torch: only when a command runs

        set_host_memory(settings.host_memory, resolve_device(settings.device))
