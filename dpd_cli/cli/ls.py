"""``dpd ls``: the runs and experts folders below some folders, one line each."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from dpd_cli.cli.console import print_result
from dpd_cli.cli.errors import handle_errors
from dpd_cli.cli.options import examples_help

__all__ = ["ls"]

SUMMARY = (
    "List the run directories and experts folders in or below DIR (default: runs/ and the experts root), "
    "one line each, with their state and accuracy.\n\n"
    "Reads file headers and JSON, and checks each run's synthetic set and newest checkpoint against their checksums, "
    "so it stays fast; --verify checks every checkpoint and expert too, and `dpd inspect PATH` checks a folder in full."
)
EXAMPLES = [
    ("dpd ls", "runs/ and the experts root"),
    ("dpd ls runs/cifar10 --json", "the runs below runs/cifar10, as JSON"),
    ("dpd ls --verify", "also check every checkpoint and expert against its checksum (reads them all)"),
]


def ls(
    dirs: Annotated[
        list[str] | None,
        typer.Argument(metavar="DIR", show_default=False, help="Folders to search, up to 4 levels deep."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Check the tensor data of every checkpoint and expert against its checksum, not only each run's "
            "synthetic set and newest checkpoint (reads every byte: slow for big experts folders).",
        ),
    ] = False,
) -> None:
    with handle_errors():
        from dpd_cli.reports import ls as engine

        result = engine.run([Path(d) for d in dirs or []], verify=verify)
    print_result("ls", result, json_out, [] if json_out else lines(result))


ls.__doc__ = examples_help(SUMMARY, EXAMPLES, settings=False)


def _shown(path: str) -> str:
    """A path relative to the working directory when it is below it (shorter), else as found."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd().resolve()) else path
    except (OSError, ValueError):
        return path


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def _accuracy(ev: dict | None) -> str:
    if not ev or ev["mean"] is None:
        return ""
    how = ev["select"] or "final"
    if ev["select"] in ("val", "test-max") and ev["selected_iteration"] is not None:
        how += f"@{ev['selected_iteration']}"
    flags = (", optimistic" if ev["optimistic"] else "") + (", NO GAIN" if ev.get("no_gain") else "")
    if ev.get("runs") == 1:  # one network: no spread
        return f"{_pct(ev['mean'])} {ev['model']} ({how}, 1 network{flags})"
    return f"{_pct(ev['mean'])} ± {_pct(ev['std'])} {ev['model']} ({how}{flags})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell, right-aligned where the header starts with ">"; each row stays on one
    line (the terminal may wrap it)."""
    right = [h.startswith(">") for h in header]
    header = [h.removeprefix(">") for h in header]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [c.rjust(w) if ra else c.ljust(w) for c, w, ra in zip(r, widths, right, strict=True)]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def _run_row(e: dict) -> list[str]:
    rho = e["prune_ratio"]
    done = f"{e['iteration']}/{e['iterations']}" if e["iterations"] is not None else str(e["iteration"])
    criterion = (e["prune_criterion"] or "?") if rho else "-"
    rho_text = "?" if rho is None else f"{rho:g}"
    return [str(e["ipc"] or "?"), rho_text, criterion, done, e["state"], _accuracy(e["evaluation"])]


def _experts_row(e: dict) -> list[str]:
    planned = e["n_planned"]
    count = f"{e['count']} of {planned}" if planned is not None and e["count"] < planned else str(e["count"])
    return [e["model_tag"] or "?", count, str(e["epochs"] or "?"), e["state"], _pct(e["accuracy"])]


#: Per kind of folder: the table's title, its columns after the path and the dataset, a row's cells there.
_TABLES = (
    ("run", "Runs", [">ipc", ">rho", "criterion", ">iterations", "state", "accuracy %"], _run_row),
    ("experts", "Experts folders", ["model", ">experts", ">epochs", "state", ">accuracy %"], _experts_row),
)


def lines(result: dict) -> list[str]:
    """The text ``dpd ls`` prints: a table of runs, then one of experts folders; ``!`` marks folders with problems."""
    if not result["entries"]:
        where = " and ".join(result["roots"]) or "runs/ and the experts root (neither exists)"
        return [f"No runs or experts folders in {where}."]
    out: list[str] = []
    for kind, title, header, row in _TABLES:
        found = [e for e in result["entries"] if e["kind"] == kind]
        if found:
            out.append(f"{title} ({len(found)})")
            rows = [
                [("! " if e["problems"] else "  ") + _shown(e["path"]), str(e["dataset"] or "?"), *row(e)]
                for e in found
            ]
            out += _table(["  path", "dataset", *header], rows)
    if any((e.get("evaluation") or {}).get("no_gain") for e in result["entries"]):
        out.append(
            "NO GAIN: distillation did not help, the initial images score as well; `dpd inspect PATH` says more."
        )
    flagged = sum(1 for e in result["entries"] if e["problems"])
    if flagged:
        out.append(f"! {flagged} folder{'s have' if flagged > 1 else ' has'} problems: `dpd inspect PATH` says which.")
    return out
