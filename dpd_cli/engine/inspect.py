"""``dpd inspect``: what is in a run directory, an experts folder or a safetensors file dpd wrote.

Everything here reads files and returns plain, JSON-ready dicts and lists (the CLI formats
them). Only ``export_grid`` and ``plot`` write, and only the file they are given.

A broken file *inside* a folder is reported (``files[i]["error"]``, ``warnings``), never
raised: inspecting a damaged run is when this command is needed most. Only the path the user
named must be usable, else a ``StorageError`` explains what it is and what would work.
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from dpd_cli import storage
from dpd_cli.artifacts import metrics as metrics_file
from dpd_cli.artifacts import prune_counts as prune_file
from dpd_cli.artifacts import run as layout
from dpd_cli.artifacts import synthetic as synthetic_file
from dpd_cli.engine import experts as _experts
from dpd_cli.errors import StorageError

__all__ = ["inspect", "detect", "export_grid", "plot", "MAX_DISTANCE_EXPERTS", "DEFAULT_EXPERT_EPOCHS"]

#: Experts read for the parameter-distance curve (each one is read row by row, in full).
MAX_DISTANCE_EXPERTS = 10
#: M in ``‖θ_t − θ_{t+M}‖`` when ``--expert-epochs`` is not given (the MTT default).
DEFAULT_EXPERT_EPOCHS = 2

_EVAL_FILE = "eval.json"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Tensors ``load_synthetic`` / a resume need, as (header dtype, ndim): checked from the header only.
_SYNTHETIC_TENSORS = {"images": ("F32", 4), "labels": ("I64", 1), "lr": ("F32", 0), "norm_mean": ("F32", 1), "norm_std": ("F32", 1)}
_CHECKPOINT_TENSORS = {**_SYNTHETIC_TENSORS, "momentum_images": ("F32", 4), "momentum_lr": ("F32", 0), "prune_counts": ("I32", 1)}
_WHAT_WORKS = (
    "`dpd inspect` reads a run directory (from `dpd distill`), an experts folder (from `dpd experts`) "
    "or a .safetensors file written by dpd."
)


# --- detection --------------------------------------------------------------------------------
def _is_run(folder: Path) -> bool:
    return layout.is_run(folder)


def _is_experts(folder: Path) -> bool:
    return (folder / _experts.MANIFEST).is_file() or any(folder.glob("expert_*.safetensors"))


def _kind_of_folder(folder: Path) -> str | None:
    if _is_run(folder):
        return "run"
    if _is_experts(folder):
        return "experts"
    return None


def _container(path: Path) -> tuple[str, Path] | None:
    """The run or experts folder a file belongs to (a checkpoint's run is two levels up)."""
    parent = path.parent
    if parent.name == layout.CHECKPOINTS and _is_run(parent.parent):
        return "run", parent.parent
    kind = _kind_of_folder(parent) if parent.is_dir() else None
    return (kind, parent) if kind else None


def detect(path: Path) -> str:
    """Which kind of thing ``path`` is: ``"run"``, ``"experts"`` or ``"file"``.

    Raises:
        StorageError: ``path`` does not exist, or is a folder that is neither a run nor an experts
            folder (the message lists any such folders found inside it).
    """
    path = Path(path)
    if not path.exists():
        near = _found_below(path.parent, depth=1) if path.parent.is_dir() else []
        hint = f" Found next to it: {_list_found(near)}." if near else ""
        raise StorageError(f"{path} does not exist.{hint} {_WHAT_WORKS}")
    if not path.is_dir():
        return "file"
    kind = _kind_of_folder(path)
    if kind:
        return kind
    found = _found_below(path, depth=2)
    if found:
        more = " and maybe more" if len(found) >= 6 else ""
        raise StorageError(f"{path} is neither a run directory nor an experts folder, but it contains: {_list_found(found)}{more}. "
                           "Pass one of those to `dpd inspect`.")
    try:
        names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise StorageError(f"Cannot read the folder {path}: {e.strerror or e}.") from e
    where = f"It holds {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}." if names else "It is empty."
    raise StorageError(
        f"{path} is neither a run directory (settings.json, synthetic.safetensors or checkpoints/) nor an experts "
        f"folder (experts.json or expert_*.safetensors). {where} {_WHAT_WORKS}"
    )


def _found_below(folder: Path, depth: int, limit: int = 6) -> list[tuple[Path, str]]:
    """Runs and experts folders up to ``depth`` levels below ``folder`` (at most ``limit``)."""
    found: list[tuple[Path, str]] = []
    level = [folder]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                children = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
            except OSError:
                continue
            for c in children[:200]:
                kind = _kind_of_folder(c)
                if kind:
                    found.append((c, kind))
                    if len(found) >= limit:
                        return found
                else:
                    nxt.append(c)
        level = nxt
    return found


def _list_found(found: list[tuple[Path, str]]) -> str:
    return ", ".join(f"{p} ({'run' if k == 'run' else 'experts folder'})" for p, k in found)


def inspect(path: Path, expert_epochs: int | None = None, max_experts: int = MAX_DISTANCE_EXPERTS) -> dict:
    """Gather everything worth knowing about ``path``.

    Args:
        path: A run directory, an experts folder, or a safetensors file written by dpd.
        expert_epochs: M of the experts' parameter distance ``‖θ_t − θ_{t+M}‖`` (default 2).
        max_experts: At most this many experts are read for that distance.

    Returns:
        ``{"kind": "run" | "experts" | "file", "path": ..., ..., "warnings": [...]}``; JSON-ready
        (no NaN: missing numbers are ``None``).

    Raises:
        StorageError: Missing path, a file that is not safetensors, or a folder of another kind.
    """
    path = Path(path)
    kind = detect(path)
    if kind == "run":
        return _inspect_run(path)
    if kind == "experts":
        return _inspect_experts(path, expert_epochs or DEFAULT_EXPERT_EPOCHS, max_experts)
    return _inspect_file(path)


# --- small helpers ----------------------------------------------------------------------------
def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _int_list(x) -> list[int]:
    """The integers of a JSON list (anything else, e.g. a field older files lack, is an empty list)."""
    return [v for v in x if isinstance(v, int) and not isinstance(v, bool)] if isinstance(x, list) else []


def _finite(x) -> float | None:
    """A float, or None for NaN/Inf/non-numbers (JSON has no NaN)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None



def _same_dataset(name, key) -> bool:
    """Whether an expert file's ``dataset`` (a registry name) matches experts.json's dataset key.

    The key tells image folders apart by folder name (``imagefolder-<folder>``); the files store
    the registry name ``imagefolder``.
    """
    return name == key or (name == "imagefolder" and isinstance(key, str) and key.startswith("imagefolder-"))


def _short_error(e: Exception, path: Path, name: str) -> str:
    """The error message with the (long) path replaced by the name shown next to it."""
    return str(e).replace(str(path), name)


def _check_header_tensors(tf: storage.TensorFile, required: dict[str, tuple[str, int]]) -> None:
    """Check tensor names, dtypes and ranks from the header alone (no data is read)."""
    for name, (dtype, ndim) in required.items():
        entry = tf.header.get(name)
        if entry is None:
            raise StorageError(f"{tf.path} lacks the tensor {name!r}.")
        if entry["dtype"] != dtype or len(entry["shape"]) != ndim:
            raise StorageError(f"{tf.path}: tensor {name!r} is {entry['dtype']} {tuple(entry['shape'])}; expected {dtype} with {ndim} dimensions.")


def _open_checked(path: Path, fmt: str | None, required: dict | None = None) -> storage.TensorFile:
    """``TensorFile`` (header, metadata and offsets validated) plus a header-only tensor check."""
    tf = storage.TensorFile(path, fmt)
    if required:
        _check_header_tensors(tf, required)
    return tf


def _decode_meta_lenient(raw: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Metadata values JSON-decoded where possible; the keys that are not JSON."""
    meta: dict[str, Any] = {}
    not_json = []
    for k, v in raw.items():
        if k in ("format", "format_version", "dpd_version"):
            meta[k] = v
            continue
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
            not_json.append(k)
    return meta, not_json


def _model_tag(spec: dict | None) -> str | None:
    if not isinstance(spec, dict):
        return None
    try:
        from dpd_cli.models import ModelSpec

        return ModelSpec.from_dict(spec).tag()
    except (KeyError, TypeError, ValueError):
        return spec.get("name")


def _locked_by_other(folder: Path) -> bool:
    """Whether a dpd process holds ``folder/.lock`` now (probed read-only, nothing is written)."""
    lock = folder / ".lock"
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _file_entry(path: Path, name: str, valid: bool | None, error: str | None = None, fmt: str | None = None) -> dict:
    try:
        size = path.stat().st_size
    except OSError:
        size = None
    return {"name": name, "size": size, "format": fmt, "valid": valid, "error": error}


def _check_png(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"{path.name} cannot be read ({e.strerror or e})."
    return None if head == _PNG_MAGIC else f"{path.name} is not a PNG image (truncated or overwritten)."


def _latest_evaluations(path: Path, warnings: list[str], name: str) -> dict | None:
    """eval.json's latest entry per (source, model, protocol), or None when there is no file."""
    if not path.exists():
        return None
    from dpd_cli.engine.evaluate import load_eval

    try:
        data = load_eval(path)
    except StorageError as e:
        warnings.append(_short_error(e, path, name))
        return {"file": name, "valid": False, "error": _short_error(e, path, name), "n_entries": 0, "results": []}
    latest: dict[tuple, dict] = {}
    skipped = 0
    for e in data["results"]:
        if not isinstance(e, dict) or not {"source", "model", "mean"} <= e.keys():
            skipped += 1
            continue
        key = (e["source"], e["model"], e.get("protocol"))
        latest.pop(key, None)  # re-insert so the order follows the newest evaluations
        latest[key] = e
    if skipped:
        warnings.append(f"{name}: {skipped} entr{'y' if skipped == 1 else 'ies'} without source/model/mean skipped.")
    order = {"distilled": 0, "init": 1, "random": 2, "full": 3}
    results = []
    for e in sorted(latest.values(), key=lambda e: (str(e["model"]), str(e.get("protocol")), order.get(e["source"], 9))):
        accs = e.get("accuracies") if isinstance(e.get("accuracies"), list) else []
        results.append({
            "source": e["source"],
            "model": e["model"],
            "protocol": e.get("protocol"),
            "mean": _finite(e.get("mean")),
            "std": _finite(e.get("std")),
            "runs": e.get("runs", len(accs) or None),
            "diverged_runs": _int_list(e.get("diverged_runs")),
            "accuracies": [_finite(a) for a in accs],
            "epochs": e.get("epochs"),
            "lr": _finite(e.get("lr")),
            "ipc": e.get("ipc"),
            "dataset": e.get("dataset"),
            "iteration": e.get("iteration"),
            "timestamp": e.get("timestamp"),
            "select": e.get("select") if isinstance(e.get("select"), str) else None,
            "selected_iteration": e.get("selected_iteration") if isinstance(e.get("selected_iteration"), int) else None,
            "val_accuracy": _finite(e.get("val_accuracy")),
            "final_accuracy": _finite(e.get("final_accuracy")),
            "optimistic": e.get("optimistic") is True,
            "below_baselines": [b for b in e.get("below_baselines") or [] if isinstance(b, str)],
        })
    return {"file": name, "valid": True, "error": None, "n_entries": len(data["results"]), "results": results}


# --- run directory ----------------------------------------------------------------------------
def _curve(records: list[dict], key: str) -> dict | None:
    pts = [(int(r["iteration"]), _finite(r.get(key))) for r in records]
    pts = [(i, v) for i, v in pts if v is not None]
    if not pts:
        return None
    its, vals = [p[0] for p in pts], [p[1] for p in pts]
    k = min(range(len(vals)), key=vals.__getitem__)
    return {"iterations": its, "values": vals, "first": vals[0], "last": vals[-1], "min": vals[k], "min_iteration": its[k],
            "max": max(vals)}


def _inspect_run(run_dir: Path) -> dict:
    warnings: list[str] = []
    errors: dict[str, str] = {}  # file name -> why it is invalid
    formats: dict[str, str] = {}

    # Settings: settings.json, else the settings recorded in the synthetic set / a checkpoint.
    record: dict = {}
    spath = run_dir / layout.SETTINGS
    if spath.exists():
        try:
            record = json.loads(spath.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
                raise ValueError("no 'settings' table")
        except (OSError, ValueError) as e:
            errors[layout.SETTINGS] = f"settings.json is not a readable dpd settings file ({e})."
            record = {}
    else:
        warnings.append("settings.json is missing; the settings below come from the synthetic set or a checkpoint.")

    # The synthetic set, fully loaded and validated (it is small: the images plus a few vectors).
    synthetic = None
    syn_meta: dict | None = None
    syn_path = run_dir / layout.SYNTHETIC
    if syn_path.exists():
        try:
            t, syn_meta = synthetic_file.load(syn_path)
            synthetic = {
                "dataset": syn_meta.get("dataset"),
                "n_images": len(t["labels"]),
                "image_shape": list(t["images"].shape[1:]),
                "classes": syn_meta.get("classes"),
                "ipc": syn_meta.get("ipc"),
                "iteration": syn_meta.get("iteration"),
                "alpha": _finite(t["lr"]),
                "zca": "zca_matrix" in t,
            }
            formats[layout.SYNTHETIC] = "dpd.synthetic"
            del t
        except StorageError as e:
            errors[layout.SYNTHETIC] = _short_error(e, syn_path, layout.SYNTHETIC)
            syn_meta = None

    # Checkpoints, newest first; header-level checks are enough to know a resume can read them.
    checkpoints = []
    for p in layout.checkpoints(run_dir):
        name = f"{layout.CHECKPOINTS}/{p.name}"
        try:
            tf = _open_checked(p, "dpd.checkpoint", _CHECKPOINT_TENSORS)
            checkpoints.append({"name": name, "iteration": tf.meta.get("iteration"), "meta": tf.meta})
            formats[name] = "dpd.checkpoint"
            tf.close()
        except StorageError as e:
            errors[name] = _short_error(e, p, name)
    newest_ckpt = max(checkpoints, key=lambda c: c["iteration"] or 0, default=None)

    settings = record.get("settings") or (syn_meta or {}).get("settings") or (newest_ckpt or {}).get("meta", {}).get("settings") or {}
    if not settings:
        warnings.append("No settings found (settings.json, synthetic.safetensors and the checkpoints are missing or unreadable).")
    model = record.get("model") or (syn_meta or {}).get("model") or (newest_ckpt or {}).get("meta", {}).get("model")

    # Metrics.
    records: list[dict] = []
    mpath = run_dir / layout.METRICS
    if mpath.exists():
        try:
            records, bad, total = metrics_file.read(mpath)
            if bad:
                errors[layout.METRICS] = f"metrics.jsonl: {bad} of {total} lines are not metric records (skipped)."
        except OSError as e:
            errors[layout.METRICS] = f"metrics.jsonl cannot be read ({e.strerror or e})."

    # State: iterations done and planned, from the newest of the synthetic set, checkpoints and metrics.
    metas = [m for m in [syn_meta, (newest_ckpt or {}).get("meta")] if m]
    newest = max(metas, key=lambda m: m.get("iteration") or 0, default={})
    planned = newest.get("iterations") or settings.get("iterations")
    syn_it = (syn_meta or {}).get("iteration")
    ckpt_it = newest_ckpt["iteration"] if newest_ckpt else None
    metrics_it = int(records[-1]["iteration"]) if records else None
    done = max([i for i in (syn_it, ckpt_it, metrics_it) if i is not None], default=0)
    if planned is not None and max(syn_it or 0, ckpt_it or 0) >= planned:
        status = "finished"
    elif _locked_by_other(run_dir):
        status = "running"
    elif ckpt_it is not None:
        status = "resumable"
    else:
        status = "no checkpoint"
    state = {
        "status": status,
        "iteration": done,
        "iterations": planned,
        "synthetic_iteration": syn_it,
        "checkpoint_iteration": ckpt_it,
        "metrics_iteration": metrics_it,
    }
    if status == "resumable" and metrics_it is not None and metrics_it > ckpt_it:
        warnings.append(f"metrics.jsonl reaches iteration {metrics_it}, past the newest checkpoint ({ckpt_it}): "
                        f"a resume redoes iterations {ckpt_it + 1}-{metrics_it}.")

    # Pruning statistics.
    pruning = None
    ppath = run_dir / layout.PRUNE
    if ppath.exists():
        try:
            t, pmeta = storage.load_tensors(ppath, "dpd.prune_counts", {"counts": (torch.int32, 1)})
            formats[layout.PRUNE] = "dpd.prune_counts"
            try:
                pruning = prune_file.layer_stats(t["counts"], pmeta["layout"], int(pmeta.get("iterations_pruned") or 0))
            except (KeyError, TypeError, ValueError, StorageError) as e:
                raise StorageError(f"{ppath}: cannot read the layer statistics ({e}).") from e
            pruning["iteration"] = pmeta.get("iteration")
        except StorageError as e:
            errors[layout.PRUNE] = _short_error(e, ppath, layout.PRUNE)

    evaluation = _latest_evaluations(run_dir / _EVAL_FILE, warnings, _EVAL_FILE)
    if evaluation and not evaluation["valid"]:
        errors[_EVAL_FILE] = evaluation["error"]

    files = _run_files(run_dir, errors, formats)
    for f in files:
        if f["valid"] is False and f["name"] != _EVAL_FILE:  # eval.json's problem is already a warning
            warnings.append(f["error"])

    return {
        "kind": "run",
        "path": str(run_dir),
        "dataset": settings.get("dataset") or (syn_meta or {}).get("dataset"),
        "model": model,
        "model_tag": _model_tag(model),
        "experts_folder": record.get("experts_folder") or (syn_meta or {}).get("experts_folder"),
        "n_experts": record.get("n_experts"),
        "settings": settings,
        "state": state,
        "synthetic": synthetic,
        "loss": _curve(records, "loss"),
        "alpha": _curve(records, "lr"),
        "alpha_initial": settings.get("lr_teacher"),
        "pruning": pruning,
        "evaluation": evaluation,
        "files": files,
        "warnings": warnings,
    }


def _run_files(run_dir: Path, errors: dict[str, str], formats: dict[str, str]) -> list[dict]:
    """Every visible file of the run (checkpoints included), with its size and validity."""
    paths = [p for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    ck = run_dir / layout.CHECKPOINTS
    if ck.is_dir():
        paths += [p for p in ck.iterdir() if p.is_file() and not p.name.startswith(".")]
    order = {n: i for i, n in enumerate(layout.RUN_FILES)}

    def key(p: Path):
        top = p.relative_to(run_dir).parts[0]
        return (order.get(top, len(order)), str(p.relative_to(run_dir)))

    out = []
    for p in sorted(paths, key=key):
        name = str(p.relative_to(run_dir))
        if name in errors:
            out.append(_file_entry(p, name, False, errors[name], formats.get(name)))
        elif name in formats or name == layout.SETTINGS or name == layout.METRICS or name == _EVAL_FILE:
            out.append(_file_entry(p, name, True, None, formats.get(name)))
        elif p.suffix == ".safetensors":
            try:  # a file this command did not otherwise read
                tf = storage.TensorFile(p)
                out.append(_file_entry(p, name, True, None, tf.meta.get("format")))
                tf.close()
            except StorageError as e:
                out.append(_file_entry(p, name, False, _short_error(e, p, name)))
        elif p.suffix == ".png":
            err = _check_png(p)
            out.append(_file_entry(p, name, err is None, err))
        else:
            out.append(_file_entry(p, name, None))
    return out


# --- experts folder ---------------------------------------------------------------------------
def _inspect_experts(folder: Path, m: int, max_experts: int) -> dict:
    warnings: list[str] = []
    manifest: dict = {}
    mpath = folder / _experts.MANIFEST
    if mpath.exists():
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
            if not isinstance(manifest, dict) or not isinstance(manifest.get("compat"), dict):
                raise ValueError("no 'compat' table")
        except (OSError, ValueError) as e:
            warnings.append(f"experts.json is unreadable ({e}); `dpd distill` refuses this folder. Move it aside and rerun "
                            "`dpd experts --out` on this folder with the experts' settings to rewrite it.")
            manifest = {}
    else:
        warnings.append("experts.json is missing, so `dpd distill` refuses this folder. Rerun `dpd experts --out` on this "
                        "folder with the experts' settings to rewrite it (finished experts are kept).")
    compat = manifest.get("compat") or {}

    ppath = folder / _experts.PREPROCESS
    preprocess = None
    if ppath.exists():
        try:
            tf = _open_checked(ppath, "dpd.preprocess", {"norm_mean": ("F32", 1), "norm_std": ("F32", 1)})
            preprocess = {"zca": "zca_matrix" in tf.header, "fingerprint": tf.meta.get("fingerprint")}
            tf.close()
        except StorageError as e:
            warnings.append(_short_error(e, ppath, ppath.name))
    else:
        warnings.append("preprocess.safetensors is missing (the normalisation the experts saw); `dpd distill` cannot use "
                        "this folder. Rerun `dpd experts --out` on it with the experts' settings.")

    experts: list[dict] = []
    good: list[storage.TensorFile] = []  # open files compatible with the first valid one
    ref = None
    for p in sorted(folder.glob("expert_*.safetensors")):
        entry: dict = {"file": p.name, "size": p.stat().st_size, "valid": False, "error": None}
        experts.append(entry)
        try:
            tf = _open_checked(p, _experts.TRAJECTORY, {"trajectory": ("F32", 2)})
            meta = tf.meta
            layout = meta.get("layout") or []
            rows, cols = tf.shape("trajectory")
            epochs = meta.get("epochs")
            if epochs is None or rows != int(epochs) + 1 or cols != sum(_numel(s) for _, s in layout):
                raise StorageError(f"{p}: trajectory is {rows}×{cols}, expected {epochs}+1 epochs × the layout's parameters. "
                                   "Delete it and rerun `dpd experts`.")
        except (StorageError, TypeError, ValueError) as e:
            entry["error"] = _short_error(e, p, p.name)
            warnings.append(entry["error"])
            continue
        accs = [_finite(a) for a in (meta.get("test_accuracy") or [])]
        entry.update({
            "valid": True,
            "index": meta.get("index"),
            "epochs": int(epochs),
            "n_params": cols,
            "final_test_accuracy": accs[-1] if accs else None,
            "test_accuracy": accs,
            "train_images_per_s": _finite(meta.get("train_images_per_s")),
            "seed": meta.get("seed"),
        })
        if ref is None:
            ref = {"file": p.name, "meta": meta}
        problems = []
        if meta.get("model") != ref["meta"].get("model"):
            problems.append(f"model {_model_tag(meta.get('model'))} differs from {ref['file']}'s {_model_tag(ref['meta'].get('model'))}")
        elif meta.get("layout") != ref["meta"].get("layout"):
            problems.append(f"its parameter layout differs from {ref['file']}'s")
        if int(epochs) != int(ref["meta"]["epochs"]):
            problems.append(f"{epochs} epochs, {ref['file']} has {ref['meta']['epochs']}")
        if compat and not _same_dataset(meta.get("dataset"), compat.get("dataset")):
            problems.append(f"dataset {meta.get('dataset')!r}, experts.json says {compat.get('dataset')!r}")
        if preprocess and meta.get("preprocess_fingerprint") not in (None, preprocess["fingerprint"]):
            problems.append("it saw another normalisation/ZCA than preprocess.safetensors")
        if problems:
            entry["compatible"] = False
            warnings.append(f"{p.name}: {'; '.join(problems)}. `dpd distill` refuses mixed folders; keep one kind of expert per folder.")
            tf.close()
        else:
            entry["compatible"] = True
            good.append(tf)
    if not experts:
        warnings.append("No expert files (expert_*.safetensors) yet: train them with `dpd experts`.")
    if compat and ref and compat.get("model") not in (None, ref["meta"].get("model")):
        warnings.append(f"experts.json's model {_model_tag(compat.get('model'))} differs from the files' {_model_tag(ref['meta'].get('model'))}.")

    ref_meta = ref["meta"] if ref else {}
    model = compat.get("model") or ref_meta.get("model")
    epochs = int(ref_meta["epochs"]) if ref else compat.get("epochs")
    n_params = sum(_numel(s) for _, s in ref_meta.get("layout", [])) if ref else None
    finals = [e["final_test_accuracy"] for e in experts if e.get("compatible") and e.get("final_test_accuracy") is not None]

    distance = None
    try:
        if good and epochs is not None and m > epochs:
            warnings.append(f"--expert-epochs {m} is more than the {epochs} epochs the experts have: no parameter distance.")
        elif good:
            distance = _distances(good[:max_experts], m, epochs, warnings)
            distance["n_experts_total"] = len(good)
    finally:
        for tf in good:
            tf.close()

    settings = manifest.get("settings") or ref_meta.get("settings") or {}
    return {
        "kind": "experts",
        "path": str(folder),
        "count": len(experts),
        "n_valid": sum(1 for e in experts if e["valid"]),
        "n_compatible": len(good),
        "dataset": compat.get("dataset") or ref_meta.get("dataset"),
        "model": model,
        "model_tag": _model_tag(model),
        "epochs": epochs,
        "n_params": n_params,
        "training": {k: compat.get(k, settings.get(k)) for k in ("lr", "momentum", "weight_decay", "batch", "dsa", "zca", "train_per_class", "seed")},
        "imported": _import_record(manifest.get("import")),
        "preprocess": preprocess,
        "accuracy": {
            "mean": sum(finals) / len(finals) if finals else None,
            "min": min(finals) if finals else None,
            "max": max(finals) if finals else None,
            "mean_per_epoch": _mean_per_epoch([e["test_accuracy"] for e in experts if e.get("compatible")]),
        },
        "experts": experts,
        "distance": distance,
        "warnings": warnings,
    }


def _import_record(record) -> dict | None:
    """``dpd experts import``'s record in experts.json: the buffer files and what they do not record."""
    if not isinstance(record, dict):
        return None
    sources = record.get("sources") if isinstance(record.get("sources"), list) else []
    return {"format": record.get("format"), "files": [s.get("file") for s in sources if isinstance(s, dict)],
            "unknown": record.get("unknown") if isinstance(record.get("unknown"), list) else []}


def _mean_per_epoch(curves: list[list]) -> list[float | None]:
    n = max((len(c) for c in curves), default=0)
    out = []
    for e in range(n):
        vals = [c[e] for c in curves if e < len(c) and c[e] is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def _distances(files: list[storage.TensorFile], m: int, epochs: int, warnings: list[str]) -> dict:
    """Mean over experts of ``‖θ_t − θ_{t+m}‖`` for t = 0..epochs−m, reading one row at a time.

    Each expert is read once, row by row, holding only the last ``m + 1`` rows: memory stays
    at a few parameter vectors whatever the number of epochs.
    """
    n_t = epochs + 1 - m
    sums = torch.zeros(n_t, dtype=torch.float64)
    used = 0
    for tf in files:
        window: list[torch.Tensor] = []
        dist = torch.zeros(n_t, dtype=torch.float64)
        for e in range(epochs + 1):
            window.append(tf.rows("trajectory", [e])[0])  # (P,) float32
            if len(window) > m:
                start = window.pop(0)
                dist[e - m] = torch.linalg.vector_norm(window[-1] - start, dtype=torch.float64)
        if not torch.isfinite(dist).all():
            warnings.append(f"{tf.path.name} holds NaN or Inf parameters; it is left out of the distance. Delete it and rerun `dpd experts`.")
            continue
        sums += dist
        used += 1
    values = (sums / used).tolist() if used else []
    return {"m": m, "t": list(range(n_t)) if used else [], "values": values, "n_experts": used}


# --- single file ------------------------------------------------------------------------------
def _inspect_file(path: Path) -> dict:
    if path.suffix in (".json", ".jsonl"):
        beside = path.with_name(path.name[: -len(".eval.json")] + ".safetensors") if path.name.endswith(".eval.json") else None
        hint = (f" `dpd inspect {beside}` shows this evaluation with the set it scores." if beside and beside.exists()
                else f" {_file_hint(path)}" if _container(path) else "")  # else the sentence above says it all
        raise StorageError(f"{path} is a JSON file (plain text: open it directly); `dpd inspect` reads run directories, "
                           f"experts folders and safetensors files.{hint}")
    try:
        header, raw = storage.read_header(path)
    except StorageError as e:
        raise StorageError(f"{e} {_file_hint(path)}") from None
    meta, not_json = _decode_meta_lenient(raw)
    warnings = [f"metadata entry {k!r} is not JSON (shown as text)." for k in not_json]
    fmt = raw.get("format")
    version = raw.get("format_version")
    known = fmt in storage.FORMAT_VERSIONS
    # A foreign file or another format version is refused, as every dpd command would refuse it.
    if fmt is None:
        raise StorageError(f"{path} is a safetensors file without dpd format metadata: it was not written by dpd. "
                           "`dpd inspect` reads run directories, experts folders and the files dpd writes.")
    if not known:
        raise StorageError(f"{path} has format {fmt!r}, which is not one dpd writes ({', '.join(storage.FORMAT_VERSIONS)}).")
    if version != str(storage.FORMAT_VERSIONS[fmt]):
        raise StorageError(f"{path} is {fmt} format version {version or '?'}; this dpd reads version "
                           f"{storage.FORMAT_VERSIONS[fmt]}. Use the dpd version that wrote it, or recreate the file.")

    tensors = [
        {"name": name, "dtype": e["dtype"], "shape": list(e["shape"]), "bytes": int(e["data_offsets"][1]) - int(e["data_offsets"][0])}
        for name, e in sorted(header.items(), key=lambda kv: int(kv[1]["data_offsets"][0]))
    ]
    details: dict | None = None
    problems: list[str] = []
    if known and version == str(storage.FORMAT_VERSIONS[fmt]):
        try:
            details = _file_details(path, fmt)
        except StorageError as e:
            problems.append(_short_error(e, path, path.name))
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"{path.name}: metadata does not fit the {fmt} format ({e}).")

    container = _container(path)
    sidecar = path.with_name(path.stem + ".eval.json")  # where `dpd evaluate FILE` writes
    evaluation = _latest_evaluations(sidecar, warnings, sidecar.name)
    return {
        "kind": "file",
        "path": str(path),
        "size": path.stat().st_size,
        "format": fmt,
        "format_version": version,
        "format_version_supported": storage.FORMAT_VERSIONS.get(fmt) if known else None,
        "dpd_version": raw.get("dpd_version"),
        "valid": not problems,
        "problems": problems,
        "tensors": tensors,
        "metadata": {k: v for k, v in meta.items() if k not in ("format", "format_version", "dpd_version")},
        "details": details,
        "part_of": {"kind": container[0], "path": str(container[1])} if container else None,
        "evaluation": evaluation,
        "warnings": warnings,
    }


def _file_hint(path: Path) -> str:
    container = _container(path)
    if container:
        what = "run" if container[0] == "run" else "experts folder"
        return f"`dpd inspect {container[1]}` shows the rest of the {what}."
    return _WHAT_WORKS


def _file_details(path: Path, fmt: str) -> dict:
    """Format-specific facts, after the checks the commands that read the file would make."""
    if fmt in ("dpd.synthetic", "dpd.checkpoint"):
        t, meta = synthetic_file.load(path)
        return {
            "dataset": meta.get("dataset"),
            "n_images": len(t["labels"]),
            "image_shape": list(t["images"].shape[1:]),
            "n_classes": len(meta.get("classes") or []),
            "ipc": meta.get("ipc"),
            "iteration": meta.get("iteration"),
            "iterations": meta.get("iterations"),
            "alpha": _finite(t["lr"]),
            "zca": "zca_matrix" in t,
            "model_tag": _model_tag(meta.get("model")),
        }
    if fmt == "dpd.trajectory":
        with storage.TensorFile(path, fmt) as tf:
            _check_header_tensors(tf, {"trajectory": ("F32", 2)})
            rows, cols = tf.shape("trajectory")
            meta = tf.meta
        if rows != int(meta["epochs"]) + 1 or cols != sum(_numel(s) for _, s in meta["layout"]):
            raise StorageError(f"{path}: trajectory is {rows}×{cols}, which does not match its epochs and layout.")
        accs = meta.get("test_accuracy") or []
        return {
            "dataset": meta.get("dataset"),
            "index": meta.get("index"),
            "epochs": int(meta["epochs"]),
            "n_params": cols,
            "final_test_accuracy": _finite(accs[-1]) if accs else None,
            "model_tag": _model_tag(meta.get("model")),
        }
    if fmt == "dpd.prune_counts":
        t, meta = storage.load_tensors(path, fmt, {"counts": (torch.int32, 1)})
        return prune_file.layer_stats(t["counts"], meta["layout"], int(meta.get("iterations_pruned") or 0))
    if fmt == "dpd.preprocess":
        with storage.TensorFile(path, fmt) as tf:
            _check_header_tensors(tf, {"norm_mean": ("F32", 1), "norm_std": ("F32", 1)})
            return {"zca": "zca_matrix" in tf.header, "fingerprint": tf.meta.get("fingerprint")}
    with storage.TensorFile(path, fmt):  # other dpd formats: the generic checks
        return {}


# --- outputs ----------------------------------------------------------------------------------
def export_grid(path: Path, out: Path) -> dict:
    """Write the synthetic images of a run (or of a synthetic/checkpoint file) as a PNG grid.

    A run whose synthetic.safetensors is unreadable falls back to its newest loadable checkpoint.

    Returns:
        ``{"path", "source", "n_images", "iteration"}``.

    Raises:
        StorageError: Nothing loadable holds images.
    """
    from dpd_cli.data import Preprocess
    from dpd_cli.images import save_grid

    path = Path(path)
    kind = detect(path)
    if kind == "experts":
        raise StorageError(f"{path} is an experts folder: it holds trajectories, not images. Pass a run directory to --export-grid.")
    candidates = [path] if kind == "file" else [path / layout.SYNTHETIC, *layout.checkpoints(path)]
    errors = []
    for p in candidates:
        if not p.exists():
            continue
        try:
            t, meta = synthetic_file.load(p)
        except StorageError as e:
            errors.append(str(e))
            continue
        images01 = Preprocess.from_tensors(t).invert(t["images"])  # (N, C, H, W) in [0, 1]
        save_grid(images01, t["labels"], len(meta["classes"]), Path(out))
        return {"path": str(out), "source": str(p), "n_images": len(t["labels"]), "iteration": meta.get("iteration")}
    raise StorageError(f"No synthetic images to draw in {path}: {' '.join(errors) or 'it has no synthetic.safetensors or checkpoint yet.'}")


def plot(facts: dict, out: Path) -> Path | None:
    """Draw a run's loss, α and per-layer prune %, or an experts folder's distance and accuracy curves.

    Returns:
        The PNG written, or ``None`` when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    if facts["kind"] == "run":
        fig = Figure(figsize=(12, 3.8), layout="constrained")
        ax_loss, ax_alpha, ax_prune = fig.subplots(1, 3)
        _line(ax_loss, facts.get("loss"), "matching loss", "iteration")
        _line(ax_alpha, facts.get("alpha"), "α (student step size)", "iteration")
        layers = (facts.get("pruning") or {}).get("layers", [])[:20]
        if layers:
            names = [r["name"] for r in layers][::-1]
            ax_prune.barh(names, [r["mean_pct"] for r in layers][::-1], color="tab:red")
            ax_prune.set_xlabel("mean % of the layer pruned per iteration")
            ax_prune.tick_params(axis="y", labelsize=7)
        else:
            ax_prune.text(0.5, 0.5, "no pruning data", ha="center", va="center", transform=ax_prune.transAxes)
        ax_prune.set_title("pruning by layer")
        fig.suptitle(f"{facts['path']} ({facts['state']['iteration']}/{facts['state']['iterations']} iterations)")
    elif facts["kind"] == "experts":
        fig = Figure(figsize=(9, 3.8), layout="constrained")
        ax_d, ax_a = fig.subplots(1, 2)
        d = facts.get("distance") or {}
        _line(ax_d, {"iterations": d.get("t", []), "values": d.get("values", [])},
              f"‖θ(t) − θ(t+{d.get('m', DEFAULT_EXPERT_EPOCHS)})‖ (mean of {d.get('n_experts', 0)} experts)", "start epoch t")
        for e in facts["experts"]:
            if e.get("compatible") and e.get("test_accuracy"):
                ax_a.plot([100 * a if a is not None else float("nan") for a in e["test_accuracy"]], color="0.75", linewidth=0.8)
        mean = facts["accuracy"]["mean_per_epoch"]
        ax_a.plot([100 * a if a is not None else float("nan") for a in mean], color="tab:blue", label="mean")
        ax_a.set_title("test accuracy (%)")
        ax_a.set_xlabel("epoch")
        ax_a.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle(f"{facts['path']} ({facts['count']} experts)")
    else:
        raise ValueError("plot needs a run or an experts folder")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    with storage.atomic_write(Path(out)) as f:
        f.write(buf.getvalue())
    return Path(out)


def _line(ax, curve: dict | None, title: str, xlabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    if curve and curve.get("values"):
        ax.plot(curve["iterations"], curve["values"], marker="." if len(curve["values"]) < 50 else None)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
