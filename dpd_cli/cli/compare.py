"""``dpd compare``: evaluations of several runs side by side, with paired differences."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dpd_cli.cli.console import print_result
from dpd_cli.cli.errors import handle_errors
from dpd_cli.cli.options import examples_help
from dpd_cli.cli.results import SOURCE_LABELS, marks, pct, spread

__all__ = ["compare"]

SUMMARY = (
    "Show the evaluations of runs side by side: test accuracy mean ± std over networks, with the protocol, "
    "the checkpoint selection and the iteration.\n\n"
    "Runs evaluated with the same network seeds (same `dpd evaluate --seed` and --runs) are also compared network "
    "by network: the mean paired difference against the first RUN, with a 95 % t-interval."
)
EXAMPLES = [
    ("dpd compare runs/mtt runs/dpd", "DPD against plain MTT, evaluated with the same seeds"),
    ("dpd compare runs/a runs/b runs/c --json", "three runs, as JSON"),
]
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def compare(
    runs: Annotated[
        list[str],
        typer.Argument(
            metavar="RUN",
            show_default=False,
            help="Run directories evaluated with `dpd evaluate` (or evaluated files).",
        ),
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    with handle_errors():
        from dpd_cli.reports import compare as engine

        result = engine.run([Path(r) for r in runs])
    print_result("compare", result, json_out, [] if json_out else lines(result))


compare.__doc__ = examples_help(SUMMARY, EXAMPLES, settings=False)


def _label(i: int) -> str:
    return _LETTERS[i] if i < len(_LETTERS) else f"#{i + 1}"


def _points(x: float) -> str:
    return f"{100 * x:+.2f}"


def _which(cell: dict) -> str:
    """Which set was evaluated: the final one, or a checkpoint and how it was chosen."""
    it = cell["selected_iteration"] if cell["selected_iteration"] is not None else cell["iteration"]
    if cell["select"] == "val":
        return f"checkpoint {it}, chosen by validation accuracy"
    if cell["select"] == "test-max":
        return f"checkpoint {it}, chosen on the test set (optimistic)"
    return "" if it is None else f"iteration {it}"


def _run_line(i: int, r: dict) -> str:
    what = [str(r["dataset"] or "?"), f"IPC {r['ipc']}" if r["ipc"] is not None else ""]
    rho = r["prune_ratio"]
    if rho is not None:
        what.append(f"rho {rho:g}" + (f" ({r['prune_criterion']})" if rho and r["prune_criterion"] else ""))
    return f"  {_label(i)}  {r['path']}  " + ", ".join(w for w in what if w)


def lines(result: dict) -> list[str]:
    """The text ``dpd compare`` prints: the runs, then one block per (model, source, protocol)."""
    runs = result["runs"]
    out = [
        "Runs",
        *(_run_line(i, r) for i, r in enumerate(runs)),
        "",
        "Test accuracy %, mean ± std (networks): the latest evaluation of each run",
    ]
    for row in result["rows"]:
        out.append(f"{row['model']} / {SOURCE_LABELS.get(row['source'], row['source'])} / {row['protocol']} protocol")
        for i, cell in enumerate(row["cells"]):
            if cell is None:
                out.append(f"  {_label(i)}  not evaluated")
                continue
            details = [_which(cell)]
            details += [f"{cell['epochs']} epochs"] if cell["epochs"] else []
            details += [f"evaluation loop v{cell['protocol_version']}"] if cell["protocol_version"] else []
            details += [f"no gain: initial images {pct(cell['no_gain']['initial'])}"] if cell["no_gain"] else []
            details = ", ".join(d for d in details if d)
            out.append(f"  {_label(i)}  {spread(cell['mean'], cell['std'], cell['runs'])}{marks(cell)}  {details}")
        out += [_difference_line(d) for d in row["differences"] if d is not None]
    cells = [c for row in result["rows"] for c in row["cells"] if c]
    if any(c["diverged_runs"] for c in cells):
        out.append("* some trainings diverged (training loss NaN/Inf); they count at the accuracy they ended with.")
    if any(c["optimistic"] for c in cells):
        out.append("† selected on the test set: optimistic, as published tables are.")
    out += [f"! {c['no_gain']['message']}" for c in cells if c["no_gain"]]
    return out


def _difference_line(d: dict) -> str:
    name = f"{_label(d['run'])} − {_label(d['against'])}"
    if not d["paired"]:
        return f"  {name}  not paired: {d['reason']}"
    if d["ci95"] is None:
        return f"  {name}  {_points(d['mean'])} points (1 network: no interval)"
    lo, hi = d["ci95"]
    verdict = "" if lo <= 0 <= hi else ", excludes 0"
    return (
        f"  {name}  {_points(d['mean'])} points, 95% interval [{_points(lo)}, {_points(hi)}]{verdict} "
        f"(paired over {d['n']} networks)"
    )
