"""Typer options built from the settings models, so help text and env vars have one source."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from dpd_cli.settings import COMMAND_SETTINGS, env_var

__all__ = ["setting", "raw_path", "Config", "Quiet", "Json", "Verbose", "flags_from"]


def raw_path(value: str) -> str:
    """Keep a path flag as typed: Click would turn ``""`` into ``Path(".")``; the settings refuse an empty path."""
    return value


def setting(command: str, field: str, *decls: str):
    """A ``typer.Option`` for settings field ``field``; ``None`` default means "not given"."""
    f = COMMAND_SETTINGS[command].model_fields[field]
    default = f.default
    shown = "" if default is None or default == [] else f" (default: {default})"
    decls = decls or ("--" + field.replace("_", "-"),)
    # Typer renders help with Rich: "\\[" keeps the bracket literal instead of reading it as markup.
    extra = {"parser": raw_path, "metavar": "PATH"} if "Path" in str(f.annotation) else {}
    return typer.Option(*decls, help=escape(f"{f.description}{shown} [env var: {env_var(field)}]"), show_default=False, **extra)


Config = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="Settings file (TOML, JSON or YAML); flags > DPD_* env > file > defaults.", show_default=False,
                 parser=raw_path, metavar="FILE"),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output (errors still go to stderr).")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout; no progress output.")]
Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail.")]

_NOT_SETTINGS = {"config", "quiet", "json_out", "verbose"}


def flags_from(values: dict) -> dict:
    """The settings flags among a command function's ``locals()``."""
    return {k: v for k, v in values.items() if k not in _NOT_SETTINGS}
