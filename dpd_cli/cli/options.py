"""Command-line options generated from the settings models, and the options every command shares.

Each settings field (``setting_infos``) becomes one Typer option: flag, value type, default, help
text, allowed values, env var names and ``--help`` panel all come from the field. An option left
out is ``None``: "not given", so the config file, the environment or the default decide.
"""

from __future__ import annotations

from inspect import Parameter
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from dpd_cli.config.settings import COMMAND_SETTINGS, SettingInfo, by_panel, env_names

#: The epilog of the group and of every command with settings: the variables that are not settings.
ENVIRONMENT_HELP = (
    "Environment: DPD_EXPERTS_ROOT (where experts are written and looked for), DPD_DATA_ROOT (downloaded "
    "datasets), DPD_CACHE_ROOT (decoded image folders), DPD_CONFIG (a config file, when --config is not given), "
    "DPD_DEBUG=1 (show the traceback of an error), NO_COLOR=1 (no colours). Every setting X can also be set with "
    "DPD_<COMMAND>_X, or DPD_X if it means the same in every command; see each option's help and docs/guide.md."
)


def keep_text(value: str) -> str:
    """A path argument's parser: keep the text as typed (a ``Path`` type would read ``""`` as ``"."``)."""
    return value


def argument(name: str, annotation: Any, metavar: str, help_text: str, **kw: Any) -> Parameter:
    """A positional parameter of a generated command (``settings_command``'s ``arguments``)."""
    info = typer.Argument(metavar=metavar, show_default=False, help=help_text, **kw)
    return Parameter(name, Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[annotation, info])


def synthetic_target(metavar: str) -> Parameter:
    """The positional TARGET of ``evaluate`` and ``export``, kept as typed: the engine refuses an empty one."""
    help_text = "A run directory from `dpd distill`, its synthetic.safetensors, or a checkpoint."
    return argument("target", Path, metavar, help_text, parser=keep_text)


def _shown(value: Any) -> str:
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "none"
    return str(value)


def _help(command: str, s: SettingInfo) -> str:
    parts = [s.description.strip()]
    if s.choices:
        parts.append(("Comma-separated, from: " if s.kind == "list" else "One of: ") + ", ".join(s.choices) + ".")
    if s.default is not None:  # None: no default, the description says what leaving it out means
        default = (s.flag if s.default else "--no-" + s.flag[2:]) if s.kind == "bool" else _shown(s.default)
        parts.append(f"(default: {default})")
    own, shared = env_names(command, s.name)
    parts.append(f"[env: {own}{' or ' + shared if shared else ''}]")
    # Typer renders help with Rich markup: escape() keeps "[env: ...]" and "[distill]" literal.
    return escape(" ".join(parts))


def _completer(choices: tuple[str, ...]):
    """Shell completion of an allowed value; in a comma-separated list, of the item being typed."""

    def complete(incomplete: str) -> list[str]:
        head, comma, last = incomplete.rpartition(",")
        return [head + comma + c for c in choices if c.startswith(last.lower())]

    return complete


def _keyword(name: str, default: Any, annotation: Any, *decls: str, **kw: Any) -> Parameter:
    """A keyword-only parameter: one ``typer.Option``."""
    annotation = Annotated[annotation, typer.Option(*decls, show_default=False, **kw)]
    return Parameter(name, Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _option(command: str, s: SettingInfo) -> Parameter:
    kw: dict[str, Any] = {"help": _help(command, s), "rich_help_panel": s.panel}
    if s.kind == "bool":
        value_type, decls = bool, (f"{s.flag}/--no-{s.flag[2:]}",)
    else:
        value_type = {"int": int, "float": float}.get(s.kind, str)
        kw["metavar"] = "NAME" if s.choices and s.kind in ("choice", "text") else s.kind.upper()
        decls = (s.flag,)
        if s.choices and s.kind in ("choice", "list"):
            kw["autocompletion"] = _completer(s.choices)
    return _keyword(s.name, None, Optional[value_type], *decls, **kw)  # noqa: UP045 (typer reads it at run time)


def settings_parameters(command: str) -> list[Parameter]:
    """One keyword parameter per setting of ``command``, ordered by panel, then as declared."""
    infos = by_panel(COMMAND_SETTINGS[command])
    clash = {s.name for s in infos} & {p.name for p in common_parameters()}
    if clash:
        raise TypeError(f"settings of {command} named like a common option: {sorted(clash)}")
    return [_option(command, s) for s in infos]


def common_parameters() -> list[Parameter]:
    """``--config``, ``--print-config``, ``--quiet``, ``--json``: in the first panel, with ``--help``."""
    config_help = "Settings file (TOML, JSON or YAML). Precedence: flag > DPD_<COMMAND>_X > DPD_X > file > default. [env: DPD_CONFIG]"
    print_help = "Print the resolved settings as TOML, each value with its source (default, file, env, flag), and exit."
    return [
        _keyword("config", None, str | None, "--config", "-c", metavar="FILE", help=escape(config_help)),
        _keyword("print_config", False, bool, "--print-config", help=print_help),
        _keyword("quiet", False, bool, "--quiet", "-q", help="No progress output (errors still go to stderr)."),
        _keyword("json_out", False, bool, "--json", help="Print the result as JSON on stdout; no progress output."),
    ]


def examples_help(summary: str, examples: list[tuple[str, str]], settings: bool = True) -> str:
    """A command's help: its summary, then ``Examples:`` with one command and its comment per pair."""
    lines = "\n".join(f"  {escape(cmd)}\n      {escape(comment)}" for cmd, comment in examples)
    # Typer dedents help text by the indentation its lines share: an unindented last line keeps the examples'.
    last = (
        "Every option can also come from a config file (--config) or the environment (see the end)."
        if settings
        else "See docs/guide.md for what each part of the output means."
    )
    return f"{summary}\n\nExamples:\n{lines}\n{last}"


class _NoSwitchType:
    """Switches take no value: show no value type (Typer would print ``<bool>``) in ``--help``."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and not getattr(p, "count", False) and p.metavar is None:
                p.metavar = ""
        return params


class Command(_NoSwitchType, TyperCommand):
    """A ``dpd`` command: ``--help``/``-h`` and other switches show no value type."""


class Group(_NoSwitchType, TyperGroup):
    """The ``dpd`` group, with the same switches as its commands."""
