"""``dpd ls``: every run directory and experts folder below some folders, one summary each.

Only headers and JSON files are read (``dpd_cli.artifacts.run.scan``, ``dpd_cli.artifacts.experts.check``), and
the tensor data of each run's synthetic set, prune counts and newest checkpoint is checked against its checksum
(what ``dpd evaluate`` and a resume read): no tensor is loaded, and experts (gigabytes) are left to ``dpd inspect``
or ``verify=True`` (``dpd ls --verify``), so listing many runs stays fast.
"""

from __future__ import annotations

from pathlib import Path

from dpd_cli.artifacts import discover
from dpd_cli.artifacts import experts as experts_file
from dpd_cli.artifacts.run import scan as scan_run
from dpd_cli.errors import StorageError
from dpd_cli.io import paths

__all__ = ["run", "DEFAULT_RUNS", "DEPTH"]

#: Where ``dpd distill`` puts runs by default (relative to the working directory).
DEFAULT_RUNS = Path("runs")
#: How many folder levels below each root are searched.
DEPTH = 4


def _roots(dirs: list[Path]) -> list[Path]:
    for d in dirs:
        if not d.is_dir():
            what = "does not exist" if not d.exists() else "is not a folder"
            raise StorageError(
                f"{d} {what}. `dpd ls` lists the runs and experts folders below the folders it is given "
                f"(by default {DEFAULT_RUNS}/ and the experts root, {paths.experts_root()})."
            )
    return dirs or [d for d in (DEFAULT_RUNS, paths.experts_root()) if d.is_dir()]


def _latest_distilled(ev: dict | None) -> dict | None:
    """The distilled result appended last to eval.json."""
    hits = [r for r in (ev or {}).get("results", []) if r["source"] == "distilled"]
    if not hits:
        return None
    r = max(hits, key=lambda r: r["position"])
    keys = "model protocol mean std runs select selected_iteration iteration optimistic no_gain".split()
    return {k: r[k] for k in keys}


def _run_entry(run_dir: Path, verify: bool = False) -> dict:
    scan = scan_run(run_dir, every_checkpoint=verify, verify=True)
    meta = scan["synthetic"] or (scan["checkpoints"][0]["meta"] if scan["checkpoints"] else {})
    settings = (scan["settings"] or {}).get("settings") or meta.get("settings") or {}
    state = scan["state"]
    return {
        "kind": "run",
        "path": str(run_dir),
        "dataset": settings.get("dataset") or meta.get("dataset"),
        "ipc": settings.get("ipc") or meta.get("ipc"),
        "prune_ratio": settings.get("prune_ratio"),
        "prune_criterion": settings.get("prune_criterion"),
        "iteration": state["iteration"],
        "iterations": state["iterations"],
        "state": state["status"],
        "evaluation": _latest_distilled(scan["evaluation"]),
        "problems": [*scan["errors"].values(), *scan["disagreements"]],
    }


def _experts_entry(folder: Path, verify: bool = False) -> dict:
    facts = experts_file.check(folder, verify=verify)
    ref = facts["reference_meta"] or {}
    model = facts["compat"].get("model") or ref.get("model")
    finals = [e["final_test_accuracy"] for e in facts["experts"] if e["compatible"]]
    finals = [a for a in finals if a is not None]
    return {
        "kind": "experts",
        "path": str(folder),
        "dataset": facts["compat"].get("dataset") or ref.get("dataset"),
        "model_tag": experts_file.model_tag(model),
        "count": len(facts["experts"]),
        "n_planned": facts["n_planned"],
        "epochs": ref.get("epochs") or facts["compat"].get("epochs"),
        "state": facts["state"],
        "accuracy": sum(finals) / len(finals) if finals else None,
        "problems": facts["problems"],
    }


def run(dirs: list[Path] | None = None, depth: int = DEPTH, verify: bool = False) -> dict:
    """``{"roots", "entries"}``: every run directory and experts folder in or below ``dirs`` (default: ``runs/`` and
    the experts root), sorted by path; docs/formats.md lists their keys. ``problems``: what ``dpd inspect`` warns about.
    ``verify``: check the tensor data of every checkpoint and expert too, not only each run's newest files.
    """
    roots = _roots([Path(d) for d in dirs or []])
    found: dict[Path, tuple[Path, str]] = {}
    for root in roots:
        kind = discover.kind_of(root)
        for path, k in [(root, kind)] if kind else discover.find(root, depth):
            found.setdefault(path.resolve(), (path, k))
    entries = [
        (_run_entry if k == "run" else _experts_entry)(p, verify)
        for p, k in sorted(found.values(), key=lambda x: str(x[0]))
    ]
    return {"roots": [str(r) for r in roots], "entries": entries}
