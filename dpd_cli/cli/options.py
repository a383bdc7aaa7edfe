"""Command-line options generated from the settings models, and the options every command shares.

Each settings field (``dpd_cli.config.settings.setting_infos``) becomes one Typer option: flag, value
type, default, help text, allowed values, env var names and ``--help`` panel all come from the
field, so a new setting needs no edit here. An option left out is ``None``: "not given", so the
config file, the environment or the default decide (``dpd_cli.config.settings.resolve_sources``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from dpd_cli.config.settings import COMMAND_SETTINGS, PANELS, SettingInfo, env_names, setting_infos

__all__ = [
    "COMMON",
    "ENVIRONMENT_HELP",
    "Command",
    "Group",
    "common_parameters",
    "examples_help",
    "keep_text",
    "settings_parameters",
    "synthetic_target",
]

#: Parameters of every settings command besides the settings themselves.
COMMON = ("config", "print_config", "quiet", "json_out")

#: The epilog of every command: variables that are not settings.
ENVIRONMENT_HELP = (
    "Environment: DPD_EXPERTS_ROOT (where experts are written and looked for), DPD_DATA_ROOT (downloaded "
    "datasets), DPD_CACHE_ROOT (decoded image folders), DPD_CONFIG (a config file, when --config is not given), "
    "DPD_DEBUG=1 (show the traceback of an error), NO_COLOR=1 (no colours). Every setting X can also be set with "
    "DPD_<COMMAND>_X, or DPD_X if it means the same in every command; see each option's help and docs/guide.md."
)

_VALUE = {
    "int": (int, "INT"),
    "float": (float, "FLOAT"),
    "path": (str, "PATH"),
    "choice": (str, "NAME"),
    "list": (str, "LIST"),
    "text": (str, "TEXT"),
}


def keep_text(value: str) -> str:
    """A path argument's parser: keep the text as typed (a ``Path`` type would read ``""`` as ``"."``)."""
    return value


def synthetic_target(metavar: str) -> inspect.Parameter:
    """The positional TARGET of ``evaluate`` and ``export``: a run directory, its synthetic set or a checkpoint.

    Kept as typed (``keep_text``): the engine refuses an empty TARGET, which a ``Path`` would read as ".".
    """
    return inspect.Parameter(
        "target",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[
            Path,
            typer.Argument(
                metavar=metavar,
                show_default=False,
                parser=keep_text,
                help="A run directory from `dpd distill`, its synthetic.safetensors, or a checkpoint.",
            ),
        ],
    )


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
    if s.kind == "bool":
        if s.default is not None:  # None: no default, the description says what leaving it out means
            parts.append(f"(default: {s.flag if s.default else '--no-' + s.flag[2:]})")
    elif s.default is not None:
        parts.append(f"(default: {_shown(s.default)})")
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


def _option(command: str, s: SettingInfo) -> inspect.Parameter:
    kw: dict[str, Any] = {"help": _help(command, s), "show_default": False, "rich_help_panel": s.panel}
    if s.kind == "bool":
        annotation: Any = Optional[bool]  # noqa: UP045 (typer reads it at run time)
        decls = (f"{s.flag}/--no-{s.flag[2:]}",)
    else:
        value_type, kw["metavar"] = _VALUE["choice" if s.choices and s.kind == "text" else s.kind]
        annotation = Optional[value_type]  # noqa: UP045
        decls = (s.flag,)
        if s.choices and s.kind in ("choice", "list"):
            kw["autocompletion"] = _completer(s.choices)
    return inspect.Parameter(
        s.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[annotation, typer.Option(*decls, **kw)],
    )


def settings_parameters(command: str) -> list[inspect.Parameter]:
    """One keyword parameter per setting of ``command``, ordered by panel (``PANELS``), then as declared."""
    infos = list(setting_infos(COMMAND_SETTINGS[command]).values())
    clash = {s.name for s in infos} & set(COMMON)
    if clash:
        raise TypeError(f"settings of {command} named like a common option: {sorted(clash)}")
    order = {p: i for i, p in enumerate(PANELS)}
    infos.sort(key=lambda s: order.get(s.panel, len(PANELS)))
    return [_option(command, s) for s in infos]


def common_parameters() -> list[inspect.Parameter]:
    """``--config``, ``--print-config``, ``--quiet``, ``--json``: in the first panel, with ``--help``."""
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter(
            "config",
            kw,
            default=None,
            annotation=Annotated[
                str | None,
                typer.Option(
                    "--config",
                    "-c",
                    metavar="FILE",
                    show_default=False,
                    help=escape(
                        "Settings file (TOML, JSON or YAML). Precedence: flag > DPD_<COMMAND>_X > DPD_X > file > "
                        "default. [env: DPD_CONFIG]"
                    ),
                ),
            ],
        ),
        inspect.Parameter(
            "print_config",
            kw,
            default=False,
            annotation=Annotated[
                bool,
                typer.Option(
                    "--print-config",
                    show_default=False,
                    help="Print the resolved settings as TOML, each value with its source (default, file, env, flag), and exit.",
                ),
            ],
        ),
        inspect.Parameter(
            "quiet",
            kw,
            default=False,
            annotation=Annotated[
                bool,
                typer.Option(
                    "--quiet", "-q", show_default=False, help="No progress output (errors still go to stderr)."
                ),
            ],
        ),
        inspect.Parameter(
            "json_out",
            kw,
            default=False,
            annotation=Annotated[
                bool,
                typer.Option(
                    "--json", show_default=False, help="Print the result as JSON on stdout; no progress output."
                ),
            ],
        ),
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


def _switches_without_type(params: list) -> list:
    """Switches take no value: show no value type (Typer would print ``<bool>``) in ``--help``."""
    for p in params:
        if getattr(p, "is_flag", False) and not getattr(p, "count", False) and p.metavar is None:
            p.metavar = ""
    return params


class Command(TyperCommand):
    """A ``dpd`` command: ``--help``/``-h`` and other switches show no value type."""

    def get_params(self, ctx):
        return _switches_without_type(super().get_params(ctx))


class Group(TyperGroup):
    """The ``dpd`` group, with the same switches as its commands."""

    def get_params(self, ctx):
        return _switches_without_type(super().get_params(ctx))
