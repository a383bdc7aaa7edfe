"""What a run directory's files say together: ``scan`` reads its progress (headers and JSON only) and
lists the places where the files disagree; ``dpd inspect`` and ``dpd ls`` report it. The file names are
in ``dpd_cli.artifacts.layout``.
"""

from __future__ import annotations

from pathlib import Path

from dpd_cli.artifacts import evaluation, json_int, run_settings, short_message
from dpd_cli.artifacts import metrics as metrics_file
from dpd_cli.artifacts import prune_counts as prune_file
from dpd_cli.artifacts import synthetic as synthetic_file
from dpd_cli.artifacts.layout import (
    CHECKPOINTS,
    EVAL,
    METRICS,
    PRUNE,
    SETTINGS,
    SYNTHETIC,
    checkpoint_iteration,
    checkpoints,
)
from dpd_cli.errors import OutputExistsError, StorageError
from dpd_cli.io import storage

__all__ = ["disagreements", "scan", "summarize", "refuse_running"]


# --- the run as a whole -------------------------------------------------------------------------
def refuse_running(target: Path, instead: str) -> None:
    """Refuse a run directory, or its synthetic set, while another process holds the run's lock (``dpd distill``
    writing it): its synthetic set changes at every checkpoint and is not the run's result. A checkpoint named
    explicitly is fine (it never changes once written).

    ``instead``: how to use the newest complete checkpoint instead, with ``{checkpoint}`` for its path.
    """
    target = Path(target)
    run_dir = target if target.is_dir() else target.parent if target.name == SYNTHETIC else None
    holder = storage.lock_holder(run_dir) if run_dir is not None else None
    if holder is None:
        return
    newest = next((p for p in checkpoints(run_dir) if _header_ok(p)), None)
    what = f"{run_dir} is being distilled right now by {holder}: its {SYNTHETIC} changes at every checkpoint and is not the run's result yet."
    if newest is None:
        raise OutputExistsError(f"{what} It has no complete checkpoint yet: wait for the run to finish.")
    raise OutputExistsError(
        f"{what} Its newest complete checkpoint is iteration {checkpoint_iteration(newest)}. Wait for the run to "
        f"finish, or {instead.format(checkpoint=newest)}."
    )


def _header_ok(path: Path) -> bool:
    try:
        synthetic_file.check_header(path)
        return True
    except StorageError:
        return False


def disagreements(
    run_dir: Path, state: dict, settings_hashes: dict[str, str], prune: int | None, missing: int, evaluated: dict
) -> list[str]:
    """Sentences on a run's files that do not tell the same story, with what to do about each.

    A checkpoint, synthetic.safetensors and prune_frequency.safetensors are written together (in
    that order) and metrics.jsonl reaches at least the newest checkpoint; all record one settings hash.

    Args:
        run_dir: The run (named in the advice).
        state: ``scan``'s: the iteration each file is at (``None``: absent or unreadable) and the run's status
            (a resumable run stopped before its last iteration: metrics past the checkpoint are expected then).
        settings_hashes: ``{file name: settings_hash}`` of settings.json, the synthetic set and the newest checkpoint.
        prune: The iteration prune_frequency.safetensors is at.
        missing: Iterations up to the newest metrics line that have no line.
        evaluated: ``{model: newest iteration}`` of eval.json's latest distilled results.
    """
    synthetic, checkpoint = state["synthetic_iteration"], state["checkpoint_iteration"]
    metrics = state["metrics_iteration"]
    out = []
    redo = f"Rerun the same `dpd distill` command with --resume to rewrite it from checkpoint {checkpoint}."
    if synthetic is not None and checkpoint is not None and synthetic != checkpoint:
        what = (
            f"`dpd evaluate {run_dir}` would score that older set. {redo}"
            if synthetic < checkpoint
            else f"a newer checkpoint is missing; a resume continues from checkpoint {checkpoint} and rewrites it."
        )
        out.append(
            f"{SYNTHETIC} is at iteration {synthetic}, the newest checkpoint at {checkpoint}, but they are written "
            f"together (a process stopped between them, or a file was replaced): {what}"
        )
    if prune is not None and checkpoint is not None and prune != checkpoint:
        out.append(
            f"{PRUNE} is at iteration {prune}, the newest checkpoint at {checkpoint}: the pruning statistics are not "
            f"the run's current ones. {redo}"
        )
    if metrics is not None and checkpoint is not None:
        if metrics < checkpoint:
            out.append(
                f"{METRICS} ends at iteration {metrics}, before the newest checkpoint ({checkpoint}): its later lines "
                "are missing, so the curves stop early."
            )
        elif metrics > checkpoint and state["status"] == "resumable":
            out.append(
                f"{METRICS} reaches iteration {metrics}, past the newest checkpoint ({checkpoint}): a resume redoes "
                f"iterations {checkpoint + 1}-{metrics}."
            )
    if missing:
        out.append(
            f"{METRICS} has no line for {missing} of iterations 1-{metrics} (lines were lost or removed), so the "
            "curves have gaps."
        )
    hashes = {name: h for name, h in settings_hashes.items() if h is not None}
    if len(set(hashes.values())) > 1:
        listed = ", ".join(f"{name} {h}" for name, h in hashes.items())
        out.append(
            f"The run's files record different settings (settings_hash: {listed}): files of different runs are "
            f"mixed in {run_dir}. Start it over with --force, or keep each run in its own folder."
        )
    now = checkpoint if checkpoint is not None else synthetic
    stale = {m: it for m, it in evaluated.items() if now is not None and it != now}
    if stale:
        which = ", ".join(f"{m} at iteration {it}" for m, it in stale.items())
        out.append(
            f"{EVAL}: the latest distilled results ({which}) are not for the run's newest iteration ({now}). Rerun "
            f"`dpd evaluate {run_dir}` for current numbers."
        )
    return out


def scan(
    run_dir: Path, every_checkpoint: bool = False, records: list[dict] | None = None, verify: bool = False
) -> dict:
    """What a run's files say about its progress, from headers and JSON (no tensor is loaded).

    Args:
        run_dir: The run directory.
        every_checkpoint: Check every checkpoint's header (else only down to the newest usable one).
        records: metrics.jsonl's records if the caller read them (``dpd_cli.artifacts.metrics.read``);
            else only the file's end is read.
        verify: Also check the tensor data of the synthetic set, prune counts and the checkpoints checked
            against their recorded checksums (``storage.verify_data``: reads every byte of them). A damaged
            newest checkpoint is then an error and the next one is tried, as a resume does.

    Returns:
        ``{"settings", "synthetic", "checkpoints", "prune", "evaluation", "errors", "state", "disagreements"}``:
        settings.json's record, the synthetic set's and prune counts' metadata (``None`` when absent or
        unusable), the usable checkpoints newest first (``{"name", "iteration", "meta"}``), eval.json's
        latest results (``dpd_cli.artifacts.evaluation.latest``), ``{file name: why it is unusable}``,
        ``{"status", "holder", "iteration", "iterations", "synthetic_iteration", "checkpoint_iteration",
        "metrics_iteration"}`` and ``disagreements``'s sentences (none while the run is running). ``status``:
        ``running`` (a process holds the run's lock), ``finished``, ``resumable`` or ``no checkpoint``.
    """

    run_dir = Path(run_dir)
    errors: dict[str, str] = {}
    settings, problem = run_settings.read(run_dir)
    if problem:
        errors[SETTINGS] = short_message(problem, run_dir / SETTINGS)

    def header(path: Path, read) -> dict | None:
        if not path.exists():
            return None
        try:
            meta = read(path)
            if verify:
                storage.verify_data(path)
            return meta
        except StorageError as e:
            name = path.relative_to(run_dir).as_posix()
            errors[name] = short_message(e, path, name)
            return None

    syn = header(run_dir / SYNTHETIC, synthetic_file.check_header)
    ckpts = []
    for p in checkpoints(run_dir):
        meta = header(p, synthetic_file.check_header)
        if meta is not None:
            ckpts.append({"name": f"{CHECKPOINTS}/{p.name}", "iteration": meta.get("iteration"), "meta": meta})
            if not every_checkpoint:
                break
    prune = header(run_dir / PRUNE, lambda p: storage.read_meta(p, prune_file.FORMAT)[1])

    missing = 0
    metrics_it = None
    if records is not None:
        its = {int(r["iteration"]) for r in records}
        metrics_it = max(its, default=None)
        missing = (metrics_it - len({i for i in its if 1 <= i <= metrics_it})) if metrics_it else 0
    elif (run_dir / METRICS).exists():
        try:
            metrics_it = metrics_file.last_iteration(run_dir / METRICS)
        except OSError as e:
            errors[METRICS] = f"{METRICS} cannot be read ({e.strerror or e})."

    newest = max(
        (m for m in (syn, ckpts[0]["meta"] if ckpts else None) if m),
        key=lambda m: json_int(m.get("iteration")) or 0,
        default={},
    )
    planned = json_int(newest.get("iterations")) or json_int(((settings or {}).get("settings") or {}).get("iterations"))
    syn_it = json_int((syn or {}).get("iteration"))
    ckpt_it = json_int(ckpts[0]["iteration"]) if ckpts else None
    written = max([i for i in (syn_it, ckpt_it) if i is not None], default=None)
    holder = storage.lock_holder(run_dir)
    if holder is not None:
        status = "running"
    elif planned is not None and written is not None and written >= planned:
        status = "finished"
    else:
        status = "resumable" if ckpt_it is not None else "no checkpoint"
    state = {
        "status": status,
        "holder": holder,
        "iteration": max([i for i in (syn_it, ckpt_it, metrics_it) if i is not None], default=0),
        "iterations": planned,
        "synthetic_iteration": syn_it,
        "checkpoint_iteration": ckpt_it,
        "metrics_iteration": metrics_it,
    }
    ev = evaluation.latest(run_dir / EVAL)
    if ev is not None and not ev["valid"]:
        errors[EVAL] = short_message(ev["error"], run_dir / EVAL)
    found = []
    if holder is None:
        evaluated = {}
        for r in (ev or {}).get("results", []):
            it = evaluation.evaluated_iteration(r)
            if r["source"] == "distilled" and it is not None:
                evaluated[str(r["model"])] = it
        hashes = {
            SETTINGS: (settings or {}).get("settings_hash"),
            SYNTHETIC: (syn or {}).get("settings_hash"),
            ckpts[0]["name"] if ckpts else "checkpoint": ckpts[0]["meta"].get("settings_hash") if ckpts else None,
        }
        found = disagreements(run_dir, state, hashes, json_int((prune or {}).get("iteration")), missing, evaluated)
    return {
        "settings": settings,
        "synthetic": syn,
        "checkpoints": ckpts,
        "prune": prune,
        "evaluation": ev,
        "errors": errors,
        "state": state,
        "disagreements": found,
    }


def summarize(run_dir: Path) -> dict:
    """A short description of a finished or partial run, from its files."""
    run_dir = Path(run_dir)
    t, meta = synthetic_file.load(run_dir / SYNTHETIC)
    return {
        "run_dir": str(run_dir),
        "synthetic": str(run_dir / SYNTHETIC),
        "dataset": meta["dataset"],
        "n_images": len(t["labels"]),
        "ipc": meta.get("ipc"),
        "iteration": meta.get("iteration"),
        "iterations": meta.get("iterations"),
        "lr": float(t["lr"]),
        "warnings": [w["message"] for w in meta.get("warnings") or []],
    }
