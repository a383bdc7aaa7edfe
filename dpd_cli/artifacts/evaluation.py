"""``eval.json`` and ``eval.partial.jsonl``: the results of ``dpd evaluate`` (docs/formats.md lists every key).

``RUN/eval.json`` holds a run directory's results; a bare file ``X.safetensors`` gets the sidecar
``X.eval.json``. ``load`` is the strict reader (``dpd evaluate`` appends to what it reads); ``latest`` reads
leniently for ``dpd inspect``, ``dpd ls`` and ``dpd compare``: damaged entries are skipped and counted,
numbers that are not finite become ``None``.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpd_cli.artifacts import json_int, json_number
from dpd_cli.artifacts.layout import EVAL
from dpd_cli.errors import StorageError
from dpd_cli.io import storage

__all__ = [
    "EVAL_FILE",
    "path_for",
    "target_of",
    "partial_path",
    "load",
    "append",
    "read_partial",
    "append_partial",
    "normalise",
    "evaluated_iteration",
    "latest",
]

EVAL_FILE = EVAL  # the run directory's name for it
FORMAT = "dpd.eval"
FORMAT_VERSION = 1
_SIDECAR = ".eval.json"  # X.safetensors -> X.eval.json
_PARTIAL = ".partial.jsonl"  # eval.json -> eval.partial.jsonl


def path_for(target: Path) -> Path:
    """Where results for ``target`` go: ``RUN/eval.json``, or ``<file stem>.eval.json`` beside a bare file."""
    target = Path(target)
    return target / EVAL_FILE if target.is_dir() else target.with_name(target.stem + _SIDECAR)


def target_of(eval_file: Path) -> Path | None:
    """The ``X.safetensors`` a sidecar ``X.eval.json`` scores (``None`` for another name, e.g. a run's eval.json)."""
    name = Path(eval_file).name
    if not name.endswith(_SIDECAR) or name == EVAL_FILE:
        return None
    return Path(eval_file).with_name(name[: -len(_SIDECAR)] + ".safetensors")


def partial_path(eval_file: Path) -> Path:
    """``eval.partial.jsonl`` beside ``eval.json`` (``X.eval.partial.jsonl`` beside ``X.eval.json``)."""
    return Path(eval_file).with_suffix(_PARTIAL)


def load(path: Path) -> dict:
    """Read an eval.json, validated (StorageError if it is not one); a missing file is an empty result list."""
    if not Path(path).exists():
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "results": []}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != FORMAT or not isinstance(data.get("results"), list):
            raise ValueError("not a dpd.eval file")
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        raise StorageError(f"{path} is not a readable dpd evaluation file ({e}). Move it aside and rerun.") from e
    return data


def append(path: Path, entries: list[dict]) -> None:
    """Add ``entries`` to the results in ``path`` (created if missing), atomically; earlier entries stay."""
    record = load(path)
    record["results"].extend(entries)
    storage.atomic_write_text(path, json.dumps(record, indent=2))


def read_partial(path: Path, wanted: dict[str, tuple]) -> dict[tuple, dict]:
    """The finished trainings in ``path`` whose key is wanted (``{key: job}``), as ``{job: outcome}``.

    A job is ``(set, model, run)``; a line whose outcome is for another model or run than its key's
    job, torn or foreign lines, and a missing or unreadable file are skipped.
    """
    done: dict[tuple, dict] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return done
    for line in lines:
        try:
            rec = json.loads(line)
            job = wanted.get(rec["key"])
            o = rec["outcome"]
            if job is not None and [o["model"], o["run"]] == list(job[1:]) and isinstance(o["accuracy"], float):
                done[job] = o
        except (ValueError, KeyError, TypeError):
            continue
    return done


def append_partial(path: Path, key: str, outcome: dict) -> None:
    """Record one finished training (synced: an interrupted evaluation keeps it)."""
    storage.append_text(path, json.dumps({"key": key, "outcome": outcome}) + "\n", sync=True)


# --- lenient reading --------------------------------------------------------------------------


def _int_list(x) -> list[int]:
    """The integers of a JSON list (anything else, e.g. a field older files lack, is an empty list)."""
    return [v for v in x if json_int(v) is not None] if isinstance(x, list) else []


def normalise(e: dict) -> dict:
    """One eval.json entry as ``inspect``, ``ls`` and ``compare`` show it: every key present, junk as None."""
    accs = e.get("accuracies") if isinstance(e.get("accuracies"), list) else []
    checkpoints = e.get("checkpoints") if isinstance(e.get("checkpoints"), list) else []
    no_gain = e.get("no_gain")
    return {
        "source": e["source"],
        "model": e["model"],
        "protocol": e.get("protocol"),
        "protocol_version": json_int(e.get("protocol_version")),
        "mean": json_number(e.get("mean")),
        "std": json_number(e.get("std")),
        "runs": e.get("runs", len(accs) or None),
        "diverged_runs": _int_list(e.get("diverged_runs")),
        "accuracies": [json_number(a) for a in accs],
        "seeds": _int_list(e.get("seeds")),
        "epochs": e.get("epochs"),
        "lr": json_number(e.get("lr")),
        "ipc": e.get("ipc"),
        "dataset": e.get("dataset"),
        "iteration": e.get("iteration"),
        "timestamp": e.get("timestamp"),
        "select": e.get("select") if isinstance(e.get("select"), str) else None,
        "selected_iteration": json_int(e.get("selected_iteration")),
        "checkpoint_iterations": [
            c["iteration"] for c in checkpoints if isinstance(c, dict) and json_int(c.get("iteration")) is not None
        ],
        "val_accuracy": json_number(e.get("val_accuracy")),
        "final_accuracy": json_number(e.get("final_accuracy")),
        "optimistic": e.get("optimistic") is True,
        "below_baselines": [b for b in e.get("below_baselines") or [] if isinstance(b, str)],
        "no_gain": {**no_gain, **{k: json_number(no_gain.get(k)) for k in ("initial", "final", "selected")}}
        if isinstance(no_gain, dict) and isinstance(no_gain.get("message"), str)
        else None,
    }


def evaluated_iteration(entry: dict) -> int | None:
    """The newest iteration a normalised entry's evaluation trained on: with ``--select val`` or ``test-max``
    the reported ``iteration`` is the selected checkpoint's, possibly older than the newest evaluated."""
    its = entry.get("checkpoint_iterations")
    return max(its) if its else json_int(entry.get("iteration"))


_ORDER = {"distilled": 0, "init": 1, "random": 2, "full": 3}


def latest(path: Path) -> dict | None:
    """The latest entry per (source, model, protocol) of an eval.json, read leniently; None without a file.

    Returns:
        ``{"valid", "error", "n_entries", "skipped", "results": [normalised entries]}``; results come
        by model, protocol, then source (distilled, init, random, full), each with its ``position``
        in the file (a larger one was appended later). An unreadable file has
        ``valid`` False, its reason in ``error`` and no results.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = load(path)
    except StorageError as e:
        return {"valid": False, "error": str(e), "n_entries": 0, "skipped": 0, "results": []}
    entries = data["results"]
    usable = [i for i, e in enumerate(entries) if isinstance(e, dict) and {"source", "model", "mean"} <= e.keys()]
    newest = {(entries[i]["source"], entries[i]["model"], entries[i].get("protocol")): i for i in usable}
    order = sorted(
        newest.values(),
        key=lambda i: (
            str(entries[i]["model"]),
            str(entries[i].get("protocol")),
            _ORDER.get(entries[i]["source"], 9),
            i,
        ),
    )
    results = [{**normalise(entries[i]), "position": i} for i in order]
    skipped = len(entries) - len(usable)
    return {"valid": True, "error": None, "n_entries": len(entries), "skipped": skipped, "results": results}
