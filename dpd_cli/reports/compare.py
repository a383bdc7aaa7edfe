"""``dpd compare``: the evaluations of several runs side by side, and paired differences.

For each (model, source, protocol) evaluated in any of the runs, the latest eval.json entry of
every run is shown. Runs evaluated with the same network seeds (the ``seeds`` list of eval.json:
the same ``dpd evaluate --seed`` and ``--runs``) trained the i-th network of each from the same
initialisation and batch order, so the difference is taken network by network: the mean paired
difference with its 95 % t-interval (``dpd_cli.stats.paired``), each run against the first.
"""

from __future__ import annotations

from pathlib import Path

from dpd_cli import stats
from dpd_cli.artifacts import discover, evaluation, run_settings
from dpd_cli.artifacts.run import refuse_running
from dpd_cli.errors import StorageError

__all__ = ["run"]

_SOURCES = {"distilled": 0, "init": 1, "random": 2, "full": 3}
#: The keys of an eval.json entry shown per run (``dpd_cli.artifacts.evaluation.normalise``).
_CELL = (
    "mean std runs accuracies seeds diverged_runs epochs lr protocol_version select selected_iteration iteration "
    "optimistic timestamp no_gain"
).split()


def _evaluations(target: Path) -> dict:
    """A run's (or a file's) latest evaluations; refuses what has none, saying what to do."""
    if not target.exists():
        raise StorageError(
            f"{target} does not exist. `dpd compare` takes run directories (or synthetic sets) evaluated "
            "with `dpd evaluate`."
        )
    refuse_running(
        target, "evaluate that checkpoint (`dpd evaluate {checkpoint}`) and compare it: `dpd compare {checkpoint}`"
    )
    kind = discover.kind_of(target) if target.is_dir() else "file"
    if kind == "experts":
        raise StorageError(
            f"{target} is an experts folder: it has no evaluations. Compare the run directories distilled "
            "from it, after `dpd evaluate RUN`."
        )
    if kind is None:
        raise StorageError(
            f"{target} is not a run directory (from `dpd distill`). `dpd ls {target}` lists the runs below it."
        )
    eval_file = evaluation.path_for(target)
    ev = evaluation.latest(eval_file)
    if ev is None:
        raise StorageError(
            f"{target} has not been evaluated ({eval_file} does not exist). Run `dpd evaluate {target}` first."
        )
    if not ev["valid"]:
        raise StorageError(ev["error"])
    if not ev["results"]:
        raise StorageError(f"{eval_file} holds no usable results. Run `dpd evaluate {target}` again.")
    record, _ = run_settings.read(target) if kind == "run" else (None, None)
    settings = (record or {}).get("settings") or {}
    first = ev["results"][0]
    return {
        "path": str(target),
        "eval_file": str(eval_file),
        "n_entries": ev["n_entries"],
        "dataset": first["dataset"],
        "ipc": first["ipc"],
        "prune_ratio": settings.get("prune_ratio"),
        "prune_criterion": settings.get("prune_criterion"),
        "results": ev["results"],
    }


def _difference(a: dict, b: dict) -> dict:
    """Run ``b`` minus run ``a`` for one row: paired per network when both trained the same networks."""
    if not a["seeds"] or a["seeds"] != b["seeds"]:
        return {"paired": False, "reason": "different network seeds (evaluate both with the same --seed and --runs)"}
    acc_a, acc_b = a["accuracies"], b["accuracies"]
    if len(acc_a) != len(a["seeds"]) or len(acc_b) != len(a["seeds"]) or None in acc_a or None in acc_b:
        return {"paired": False, "reason": "the per-network accuracies are incomplete"}
    d = stats.paired([y - x for x, y in zip(acc_a, acc_b, strict=True)])
    return {"paired": True, "n": d["n"], "mean": d["mean"], "sd": d["sd"], "ci95": d["ci"]}


def run(targets: list[Path]) -> dict:
    """Compare the evaluations of ``targets`` (run directories, or files evaluated with ``dpd evaluate FILE``).

    Returns ``{"runs", "rows"}``: a row per (model, source, protocol) holds a cell per run (``None`` where not
    evaluated) and, per run after the first, its difference against the first (docs/formats.md lists the keys).
    """
    runs = [_evaluations(Path(t)) for t in targets]
    by_run = [{(e["model"], e["source"], e["protocol"]): e for e in r["results"]} for r in runs]
    keys = dict.fromkeys(k for found in by_run for k in found)
    rows = []
    for model, source, protocol in sorted(keys, key=lambda k: (str(k[0]), str(k[2]), _SOURCES.get(k[1], 9), str(k[1]))):
        hits = [found.get((model, source, protocol)) for found in by_run]
        cells = [
            {**{k: e[k] for k in _CELL}, "evaluated_iteration": evaluation.evaluated_iteration(e)} if e else None
            for e in hits
        ]
        differences = [
            None if cells[0] is None or cell is None else {"run": j, "against": 0, **_difference(cells[0], cell)}
            for j, cell in enumerate(cells[1:], 1)
        ]
        rows.append(
            {"model": model, "source": source, "protocol": protocol, "cells": cells, "differences": differences}
        )
    return {"runs": [{k: v for k, v in r.items() if k != "results"} for r in runs], "rows": rows}
