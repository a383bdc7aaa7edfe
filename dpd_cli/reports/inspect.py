"""``dpd inspect``: what is in a run directory, an experts folder or a safetensors file dpd wrote, as JSON-ready dicts.

A broken file *inside* a folder is reported (``files[i]["error"]``, ``warnings``), never raised: inspecting
a damaged run is when this command is needed most. Only the path the user named must be usable.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from pathlib import Path
from typing import Any

import torch

from dpd_cli.artifacts import discover, evaluation, json_number, layout, short_message
from dpd_cli.artifacts import experts as experts_file
from dpd_cli.artifacts import export as export_file
from dpd_cli.artifacts import metrics as metrics_file
from dpd_cli.artifacts import preprocess as preprocess_file
from dpd_cli.artifacts import prune_counts as prune_file
from dpd_cli.artifacts import synthetic as synthetic_file
from dpd_cli.artifacts.run import scan as scan_run
from dpd_cli.data import Preprocess
from dpd_cli.errors import StorageError
from dpd_cli.io import storage
from dpd_cli.io.images import check_png, save_grid

__all__ = ["inspect", "detect", "export_grid", "MAX_DISTANCE_EXPERTS", "DEFAULT_EXPERT_EPOCHS"]

#: Experts read for the parameter-distance curve (each one is read row by row, in full).
MAX_DISTANCE_EXPERTS = 10
#: M in ``‖θ_t − θ_{t+M}‖`` when ``--expert-epochs`` is not given (the MTT default).
DEFAULT_EXPERT_EPOCHS = 2

_ENVELOPE_KEYS = ("format", "format_version", "dpd_version")
#: ``checksum`` of a file written before dpd recorded a digest of the tensor data (0.2 and older).
UNVERIFIED = "unverified (written before checksums)"
_WHAT_WORKS = (
    "`dpd inspect` reads a run directory (from `dpd distill`), an experts folder (from `dpd experts`), "
    "an export folder (from `dpd export`) or a .safetensors file."
)


# --- detection --------------------------------------------------------------------------------
def _container(path: Path) -> tuple[str, Path] | None:
    """The run or experts folder a file belongs to (a checkpoint's run is two levels up)."""
    parent = path.parent
    if parent.name == layout.CHECKPOINTS and discover.kind_of(parent.parent) == "run":
        return "run", parent.parent
    kind = discover.kind_of(parent)
    return (kind, parent) if kind else None


def _list_found(found: list[tuple[Path, str]]) -> str:
    return ", ".join(f"{p} ({'run' if k == 'run' else 'experts folder'})" for p, k in found)


def detect(path: Path) -> str:
    """``"run"``, ``"experts"``, ``"export"`` (a ``dpd export`` folder) or ``"file"``; a ``StorageError`` says what a
    missing path or a foreign folder holds."""
    path = Path(path)
    if not path.exists():
        near = discover.find(path.parent, depth=1, limit=6) if path.parent.is_dir() else []
        hint = f" Found next to it: {_list_found(near)}." if near else ""
        raise StorageError(f"{path} does not exist.{hint} {_WHAT_WORKS}")
    if not path.is_dir():
        return "file"
    kind = discover.kind_of(path)
    if kind:
        return kind
    if export_file.read_record(path) is not None:
        return "export"
    found = discover.find(path, depth=2, limit=6, max_children=200)
    if found:
        more = " and maybe more" if len(found) >= 6 else ""
        raise StorageError(
            f"{path} is neither a run directory nor an experts folder, but it contains: {_list_found(found)}{more}. "
            "Pass one of those to `dpd inspect`."
        )
    try:
        names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise StorageError(f"Cannot read the folder {path}: {e.strerror or e}.") from e
    where = f"It holds {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}." if names else "It is empty."
    raise StorageError(
        f"{path} is neither a run directory (settings.json, synthetic.safetensors or checkpoints/) nor an experts "
        f"folder (experts.json or expert_*.safetensors). {where} {_WHAT_WORKS}"
    )


def inspect(path: Path, expert_epochs: int | None = None) -> dict:
    """Everything worth knowing about ``path``: ``{"kind", "path", ..., "warnings"}`` (docs/formats.md lists the keys).

    ``expert_epochs`` is M of the experts' parameter distance ``‖θ_t − θ_{t+M}‖``.
    """
    path = Path(path)
    kind = detect(path)
    if kind == "experts":
        return _inspect_experts(path, expert_epochs or DEFAULT_EXPERT_EPOCHS)
    return {"run": _inspect_run, "export": _inspect_export, "file": _inspect_file}[kind](path)


def _evaluation(eval_file: Path, warnings: list[str]) -> dict | None:
    """eval.json's latest result per (source, model, protocol) as inspect shows it; None without a file."""
    ev = evaluation.latest(eval_file)
    if ev is None:
        return None
    name = eval_file.name
    error = short_message(ev["error"], eval_file, name) if ev["error"] else None
    if error:
        warnings.append(error)
    if ev["skipped"]:
        warnings.append(
            f"{name}: {ev['skipped']} entr{'y' if ev['skipped'] == 1 else 'ies'} without source/model/mean skipped."
        )
    return {"file": name, "valid": ev["valid"], "error": error, "n_entries": ev["n_entries"], "results": ev["results"]}


def _file_entry(path: Path, name: str, valid: bool | None, error: str | None = None, fmt: str | None = None) -> dict:
    try:
        size = path.stat().st_size
    except OSError:
        size = None
    return {"name": name, "size": size, "format": fmt, "valid": valid, "error": error}


# --- run directory ----------------------------------------------------------------------------
def _curve(records: list[dict], key: str) -> dict | None:
    pts = [(int(r["iteration"]), v) for r in records if (v := json_number(r.get(key))) is not None]
    if not pts:
        return None
    its, vals = map(list, zip(*pts, strict=True))
    low = min(pts, key=lambda p: p[1])
    curve = {"iterations": its, "values": vals, "first": vals[0], "last": vals[-1], "min": low[1]}
    return {**curve, "min_iteration": low[0], "max": max(vals)}


def _inspect_run(run_dir: Path) -> dict:
    warnings: list[str] = []
    records: list[dict] = []
    metrics_error = None
    if (run_dir / layout.METRICS).exists():
        try:
            records, bad, total = metrics_file.read(run_dir / layout.METRICS)
            if bad:
                metrics_error = f"metrics.jsonl: {bad} of {total} lines are not metric records (skipped)."
        except OSError as e:
            metrics_error = f"metrics.jsonl cannot be read ({e.strerror or e})."
    scan = scan_run(run_dir, every_checkpoint=True, records=records, verify=True)
    errors = dict(scan["errors"])  # file name -> why it is invalid
    if metrics_error:
        errors[layout.METRICS] = metrics_error
    record = scan["settings"] or {}
    if not (run_dir / layout.SETTINGS).exists():
        warnings.append("settings.json is missing; the settings below come from the synthetic set or a checkpoint.")

    # The synthetic set, fully loaded and validated (it is small: the images plus a few vectors).
    synthetic = None
    syn_meta = scan["synthetic"]
    syn_path = run_dir / layout.SYNTHETIC
    if syn_meta is not None:
        try:
            t, syn_meta = synthetic_file.load(syn_path)
            synthetic = synthetic_file.describe(t, syn_meta)
            del t
        except StorageError as e:
            errors[layout.SYNTHETIC] = short_message(e, syn_path, layout.SYNTHETIC)
            syn_meta = None
    syn_meta = syn_meta or {}
    ckpt_meta = scan["checkpoints"][0]["meta"] if scan["checkpoints"] else {}
    settings = next((d["settings"] for d in (record, syn_meta, ckpt_meta) if d.get("settings")), {})
    model = next((d["model"] for d in (record, syn_meta, ckpt_meta) if d.get("model")), None)
    if not settings:
        warnings.append(
            "No settings found (settings.json, synthetic.safetensors and the checkpoints are missing or unreadable)."
        )

    pruning = None
    ppath = run_dir / layout.PRUNE
    if ppath.exists() and layout.PRUNE not in errors:
        try:
            stats, pmeta = _layer_stats(ppath)
            pruning = {**stats, "iteration": pmeta.get("iteration")}
        except StorageError as e:
            errors[layout.PRUNE] = short_message(e, ppath, layout.PRUNE)
        except (KeyError, TypeError, ValueError) as e:
            errors[layout.PRUNE] = f"{layout.PRUNE}: cannot read the layer statistics ({e})."

    ev = _evaluation(run_dir / layout.EVAL, warnings)
    formats = {
        layout.SYNTHETIC: synthetic_file.SYNTHETIC_FORMAT,
        layout.PRUNE: prune_file.FORMAT,
        **{c["name"]: synthetic_file.CHECKPOINT_FORMAT for c in scan["checkpoints"]},
    }
    files = _run_files(run_dir, errors, formats)
    # eval.json's error is already there
    warnings += [f["error"] for f in files if f["valid"] is False and f["name"] != layout.EVAL]
    warnings += scan["disagreements"]

    return {
        "kind": "run",
        "path": str(run_dir),
        "dataset": settings.get("dataset") or syn_meta.get("dataset"),
        "model": model,
        "model_tag": experts_file.model_tag(model),
        "experts_folder": record.get("experts_folder") or syn_meta.get("experts_folder"),
        "n_experts": record.get("n_experts"),
        "settings": settings,
        "changes": record.get("changes") or [],
        "state": scan["state"],
        "synthetic": synthetic,
        "loss": _curve(records, "loss"),
        "alpha": _curve(records, "lr"),
        "alpha_initial": settings.get("lr_teacher"),
        "pruning": pruning,
        "evaluation": ev,
        "files": files,
        "warnings": warnings,
    }


def _run_files(run_dir: Path, errors: dict[str, str], formats: dict[str, str]) -> list[dict]:
    """Every visible file of the run (checkpoints included), with its size and validity."""
    folders = [run_dir, run_dir / layout.CHECKPOINTS] if (run_dir / layout.CHECKPOINTS).is_dir() else [run_dir]
    names = [str(p.relative_to(run_dir)) for d in folders for p in d.iterdir() if p.is_file() and p.name[0] != "."]
    order = {n: i for i, n in enumerate(layout.RUN_FILES)}
    out = []
    for name in sorted(names, key=lambda n: (order.get(Path(n).parts[0], len(order)), n)):
        p, valid, error, fmt = run_dir / name, True, errors.get(name), formats.get(name)
        if name in errors:
            valid = False
        elif name in formats or name in (layout.SETTINGS, layout.METRICS, layout.EVAL):
            pass
        elif p.suffix == ".safetensors":
            try:  # a file this command did not otherwise read
                meta = storage.read_meta(p)[1]
                fmt = meta.get("format")
                storage.verify_data(p, meta)
            except StorageError as e:
                valid, error = False, short_message(e, p, name)
        elif p.suffix == ".png":
            error = check_png(p)
            valid = error is None
        else:
            valid = None
        out.append(_file_entry(p, name, valid, error, fmt))
    return out


def _layer_stats(path: Path) -> tuple[dict, dict]:
    """A prune counts file's statistics per layer (``prune_counts.layer_stats``), and its metadata."""
    counts, meta = prune_file.load(path)
    return prune_file.layer_stats(counts, meta["layout"], int(meta.get("iterations_pruned") or 0)), meta


# --- experts folder ---------------------------------------------------------------------------
def _inspect_experts(folder: Path, m: int) -> dict:
    facts = experts_file.check(folder, verify=True)
    warnings = list(facts["problems"])
    compat, experts = facts["compat"], facts["experts"]
    ref_meta = facts["reference_meta"] or {}
    model = compat.get("model") or ref_meta.get("model")
    epochs = ref_meta["epochs"] if ref_meta else compat.get("epochs")
    good = [e for e in experts if e["compatible"]]
    finals = [e["final_test_accuracy"] for e in good if e.get("final_test_accuracy") is not None]

    distance = None
    if good and epochs is not None and m > epochs:
        warnings.append(
            f"--expert-epochs {m} is more than the {epochs} epochs the experts have: no parameter distance."
        )
    elif good:
        distance = _distances([folder / e["file"] for e in good[:MAX_DISTANCE_EXPERTS]], m, epochs, warnings)
        distance["n_experts_total"] = len(good)

    settings = (facts["manifest"] or {}).get("settings") or ref_meta.get("settings") or {}
    return {
        "kind": "experts",
        "path": str(folder),
        "count": len(experts),
        "n_valid": sum(1 for e in experts if e["valid"]),
        "n_compatible": len(good),
        "n_planned": facts["n_planned"],
        "being_written": facts["being_written"],
        "state": facts["state"],
        "dataset": compat.get("dataset") or ref_meta.get("dataset"),
        "model": model,
        "model_tag": experts_file.model_tag(model),
        "epochs": epochs,
        "n_params": good[0]["n_params"] if good else None,
        "training": {
            k: compat.get(k, settings.get(k))
            for k in ("lr", "momentum", "weight_decay", "batch", "dsa", "zca", "train_per_class", "seed")
        },
        "imported": _import_record((facts["manifest"] or {}).get("import")),
        "preprocess": facts["preprocess"],
        "accuracy": {
            "mean": sum(finals) / len(finals) if finals else None,
            "min": min(finals, default=None),
            "max": max(finals, default=None),
            "mean_per_epoch": _mean_per_epoch([e["test_accuracy"] for e in good]),
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
    return {
        "format": record.get("format"),
        "files": [s.get("file") for s in sources if isinstance(s, dict)],
        "unknown": record.get("unknown") if isinstance(record.get("unknown"), list) else [],
    }


def _mean_per_epoch(curves: list[list]) -> list[float | None]:
    epochs = [[a for a in col if a is not None] for col in itertools.zip_longest(*curves)]
    return [sum(vals) / len(vals) if vals else None for vals in epochs]


def _distances(files: list[Path], m: int, epochs: int, warnings: list[str]) -> dict:
    """Mean over experts of ``‖θ_t − θ_{t+m}‖`` for t = 0..epochs−m.

    Each expert is read once, row by row, holding only the last ``m + 1`` rows: memory stays
    at a few parameter vectors whatever the number of epochs.
    """
    n_t = epochs + 1 - m
    sums = torch.zeros(n_t, dtype=torch.float64)
    used = 0
    for path in files:
        dist = torch.zeros(n_t, dtype=torch.float64)
        try:
            with storage.TensorFile(path, experts_file.TRAJECTORY) as tf:
                window: deque[torch.Tensor] = deque(maxlen=m + 1)
                for e in range(epochs + 1):
                    window.append(tf.rows("trajectory", [e])[0])  # (P,) float32
                    if len(window) > m:
                        dist[e - m] = torch.linalg.vector_norm(window[-1] - window[0], dtype=torch.float64)
        except StorageError as e:  # the file changed since it was checked
            warnings.append(short_message(e, path, path.name))
            continue
        if not torch.isfinite(dist).all():
            warnings.append(
                f"{path.name} holds NaN or Inf parameters; it is left out of the distance. Delete it and rerun `dpd experts`."
            )
            continue
        sums += dist
        used += 1
    values = (sums / used).tolist() if used else []
    return {"m": m, "t": list(range(n_t)) if used else [], "values": values, "n_experts": used}


# --- export folder ----------------------------------------------------------------------------
def _inspect_export(folder: Path) -> dict:
    """A ``dpd export`` folder as its export.json records it, each listed file checked to be there."""
    record = export_file.read_record(folder)
    listed = [*record.get("files", []), export_file.README, export_file.RECORD]
    files = [_file_entry(folder / name, name, (folder / name).is_file()) for name in listed]
    warnings = [
        f"{f['name']} is missing: the folder was changed after `dpd export` wrote it." for f in files if not f["valid"]
    ]
    model = record.get("model") or {}
    size = model.get("image_size") or []
    fmt, soft = record.get("export_format"), bool(record.get("soft_labels"))
    return {
        "kind": "export",
        "path": str(folder),
        "format": fmt,
        "source": record.get("source"),
        "dataset": record.get("dataset"),
        "n_classes": len(record.get("classes") or []),
        "ipc": record.get("ipc"),
        "n_images": record.get("n_images"),
        "image_shape": [model["channels"], *size] if "channels" in model and size else None,
        "iteration": record.get("iteration"),
        "model_tag": experts_file.model_tag(model or None),
        "zca": record.get("zca"),
        "labels": export_file.label_summary(fmt, soft),
        "soft_labels": soft,
        "written_by": (record.get("versions") or {}).get("dpd"),
        "files": files,
        "warnings": warnings,
    }


# --- single file ------------------------------------------------------------------------------
def _inspect_file(path: Path) -> dict:
    if path.suffix in (".json", ".jsonl"):
        beside = evaluation.target_of(path)
        hint = f" {_file_hint(path)}" if _container(path) else ""  # else the sentence below says it all
        if beside and beside.exists():
            hint = f" `dpd inspect {beside}` shows this evaluation with the set it scores."
        raise StorageError(
            f"{path} is a JSON file (plain text: open it directly); `dpd inspect` reads run directories, "
            f"experts folders, export folders and safetensors files.{hint}"
        )
    _refuse_torch_file(path)
    try:
        header, raw = storage.read_header(path)
    except StorageError as e:
        raise StorageError(f"{e} {_file_hint(path)}") from None
    fmt = raw.get("format")
    version = raw.get("format_version")
    # A file of a version this dpd does not read is refused, as every dpd command would refuse it.
    if fmt is not None and fmt not in storage.FORMAT_VERSIONS:
        raise StorageError(
            f"{path} has format {fmt!r}, which is not one dpd writes ({', '.join(storage.FORMAT_VERSIONS)})."
        )
    readable = storage.READABLE_VERSIONS.get(fmt, ())
    if fmt is not None and version not in {str(v) for v in readable}:
        raise StorageError(
            f"{path} is {fmt} format version {version or '?'}; this dpd reads version "
            f"{' or '.join(map(str, readable))}. Use the dpd version that wrote it, or recreate the file."
        )
    meta: dict[str, Any] = {}  # the metadata values JSON-decoded where possible, else as text
    warnings = []
    for k, v in raw.items():
        if k in _ENVELOPE_KEYS:
            continue
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, RecursionError):
            meta[k] = v
            warnings.append(f"metadata entry {k!r} is not JSON (shown as text).")

    tensors = []  # in file order
    for name, e in sorted(header.items(), key=lambda kv: int(kv[1]["data_offsets"][0])):
        start, end = map(int, e["data_offsets"])
        tensors.append({"name": name, "dtype": e["dtype"], "shape": list(e["shape"]), "bytes": end - start})
    details: dict | None = None
    problems: list[str] = []
    try:
        checksum = "verified" if storage.verify_data(path, raw) else UNVERIFIED
    except StorageError as e:
        checksum = "mismatch"
        problems.append(short_message(e, path, path.name))
    if fmt is None:  # a safetensors file another tool wrote: its tensors and metadata, nothing dpd-specific
        checksum = "-"
    elif not problems:
        try:
            details = _file_details(path, fmt)
        except StorageError as e:
            problems.append(short_message(e, path, path.name))
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"{path.name}: metadata does not fit the {fmt} format ({e}).")

    container = _container(path)
    return {
        "kind": "file",
        "path": str(path),
        "size": path.stat().st_size,
        "format": fmt,
        "format_version": version,
        "format_version_supported": storage.FORMAT_VERSIONS.get(fmt),
        "written_by": raw.get("dpd_version"),
        "valid": not problems,
        "problems": problems,
        "checksum": checksum,
        "tensors": tensors,
        "metadata": meta,
        "details": details,
        "part_of": {"kind": container[0], "path": str(container[1])} if container else None,
        "evaluation": _evaluation(evaluation.path_for(path), warnings),  # where `dpd evaluate FILE` writes
        "warnings": warnings,
    }


def _refuse_torch_file(path: Path) -> None:
    """A PyTorch file (``torch.save``: a zip archive, or a pickle before PyTorch 1.6) or a NumPy archive is refused,
    saying what reads it."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return  # read_header says why
    if head not in (b"PK", b"\x80\x02"):
        return
    what = "a NumPy archive" if path.suffix == ".npz" else "a PyTorch file (torch.save)"
    if export_file.read_record(path.parent) is not None:
        hint = f"It belongs to a `dpd export` folder: `dpd inspect {path.parent}` describes it."
    elif path.suffix != ".npz":
        hint = (
            f"If it is an MTT, FTD or DATM replay buffer (replay_buffer_N.pt), convert its experts with `dpd experts "
            f"import {path} --dataset NAME --zca` (or --no-zca), then inspect the experts folder that writes."
        )
    else:
        hint = ""
    raise StorageError(
        f"{path} is {what}, not a safetensors file: `dpd inspect` reads run directories, experts folders, export "
        f"folders and safetensors files. {hint}".rstrip()
    )


def _file_hint(path: Path) -> str:
    container = _container(path)
    if container:
        what = "run" if container[0] == "run" else "experts folder"
        return f"`dpd inspect {container[1]}` shows the rest of the {what}."
    return _WHAT_WORKS


def _file_details(path: Path, fmt: str) -> dict:
    """Format-specific facts, after the checks the commands that read the file would make."""
    if fmt in (synthetic_file.SYNTHETIC_FORMAT, synthetic_file.CHECKPOINT_FORMAT):
        return synthetic_file.describe(*synthetic_file.load(path))
    if fmt == experts_file.TRAJECTORY:
        facts = experts_file.check_trajectory(path)
        shown = {k: facts[k] for k in ("index", "epochs", "n_params", "final_test_accuracy")}
        meta = facts["meta"]
        return {"dataset": meta.get("dataset"), **shown, "model_tag": experts_file.model_tag(meta.get("model"))}
    if fmt == prune_file.FORMAT:
        return _layer_stats(path)[0]
    if fmt == preprocess_file.FORMAT:
        return preprocess_file.check_header(path)
    storage.read_meta(path, fmt)  # other dpd formats: the generic checks
    return {}


# --- outputs ----------------------------------------------------------------------------------
def export_grid(path: Path, out: Path) -> dict:
    """Write the synthetic images of a run (or of a synthetic/checkpoint file) as a PNG grid: ``{"path", "source",
    "n_images", "iteration"}``. A run whose synthetic.safetensors is unreadable falls back to its newest checkpoint."""
    path = Path(path)
    candidates = [path] if detect(path) == "file" else [path / layout.SYNTHETIC, *layout.checkpoints(path)]
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
    raise StorageError(
        f"No synthetic images to draw in {path}: {' '.join(errors) or 'it has no synthetic.safetensors or checkpoint yet.'}"
    )
