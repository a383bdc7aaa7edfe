"""``dpd export``: a synthetic set in the files MTT, DATM and other tools read (``dpd_cli.artifacts.export``).

The export is written into a temporary folder next to ``--out`` and renamed into place, so ``--out`` never
holds a partial export; ``--force`` swaps the new folder in before the old one is deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from dpd_cli.artifacts import experts as experts_file
from dpd_cli.artifacts import export as export_files
from dpd_cli.artifacts import layout
from dpd_cli.artifacts import synthetic as synthetic_file
from dpd_cli.artifacts.run import refuse_running
from dpd_cli.config.settings import ExportSettings
from dpd_cli.data import Preprocess
from dpd_cli.errors import OutputExistsError, SettingsError, StorageError
from dpd_cli.events import Message, NullSink, Sink
from dpd_cli.io import storage
from dpd_cli.io.provenance import versions

_GIVE = "Give a run directory (from `dpd distill`), its synthetic.safetensors, or a checkpoint."


def source_file(target: Path) -> Path:
    """The synthetic set ``target`` names: a run directory's synthetic.safetensors, or the file itself."""
    target = Path(target)
    if not str(target).strip():
        raise StorageError(f"The target is empty. {_GIVE}")
    if not target.exists():
        raise StorageError(f"{target} does not exist. {_GIVE}")
    refuse_running(
        target, "export that checkpoint by naming it: `dpd export {checkpoint}` with the same --format and --out"
    )
    if not target.is_dir():
        return target
    if experts_file.is_folder(target):
        raise StorageError(
            f"{target} is an experts folder: it holds training trajectories, not a synthetic set. Distil one "
            f"with `dpd distill --experts {target}` and export the run directory it writes."
        )
    if not (target / layout.SYNTHETIC).exists():
        raise StorageError(
            f"{target} has no {layout.SYNTHETIC}: it is not a run directory of `dpd distill`. Give a run "
            "directory, a synthetic.safetensors file or a checkpoint."
        )
    return target / layout.SYNTHETIC


def _check_out(out: Path, source: Path, force: bool) -> None:
    """Refuse an existing --out unless --force, and --force unless it only replaces an earlier export."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file. Give a folder path for the export (it is created).")
    if not force:
        raise OutputExistsError(
            f"{out} already exists. Add --force to replace it (only a folder that `dpd export` wrote, "
            "or an empty one, is replaced), or choose another --out."
        )
    if Path(source).resolve().is_relative_to(out.resolve()):
        raise OutputExistsError(
            f"--out {out} holds the set being exported ({source}): --force would delete it. Choose another --out."
        )
    if any(out.iterdir()) and export_files.read_record(out) is None:
        raise OutputExistsError(
            f"{out} is not a folder `dpd export` wrote (it has no {export_files.RECORD}), so --force does not replace it: "
            "nothing of yours is deleted by mistake. Choose another --out, or empty the folder first."
        )


def run(settings: ExportSettings, target: Path, sink: Sink | None = None) -> dict:
    """Export the synthetic set in ``target`` as ``settings.format`` into ``settings.out``.

    Returns:
        ``{"out", "format", "source", "files", "n_images", "soft_labels", "zca", "pixels_clipped"}``
        (``pixels_clipped``: the fraction of values clipped to [0, 1], imagefolder only).
    """
    s = settings
    if s.format is None or s.out is None:
        missing = " and ".join(
            x for x, v in (("--format mtt|datm|imagefolder|npz", s.format), ("--out DIR", s.out)) if v is None
        )
        raise SettingsError(f"`dpd export` needs {missing}: which files to write, and the folder to write them to.")
    file = source_file(target)
    t, meta = synthetic_file.load(file)  # checks label_logits, the soft labels, too
    logits = t.get("label_logits")
    out = Path(s.out)
    _check_out(out, file, s.force)
    if s.format == "mtt" and logits is not None:
        raise SettingsError(
            f"{file} has learned soft labels, and --format mtt stores labels as int64 class indices: MTT's "
            "evaluate_synset casts them with .long(), so it cannot train on soft labels. Export the set with --format "
            "datm (labels_best.pt holds the logits; DATM's evaluation.py trains on their softmax) or --format npz."
        )
    if s.format == "imagefolder" and t["images"].shape[1] not in (1, 3):
        raise SettingsError(
            f"--format imagefolder writes grayscale or RGB PNGs, and these images have {t['images'].shape[1]} "
            "channels. Use --format npz or mtt."
        )
    pre = Preprocess.from_tensors(t)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        os.chmod(tmp, storage.DIR_MODE)  # mkdtemp makes it private; the export gets a run directory's mode
    except OSError as e:
        raise StorageError(f"Cannot create {out}: {e.strerror or e}. Choose a writable --out.") from e
    try:
        write = {"npz": export_files.write_npz, "imagefolder": export_files.write_imagefolder}
        files, clipped = write.get(s.format, export_files.write_torch)(tmp, s.format, t, pre, meta, logits)
        record = {
            "export_format": s.format,
            "source": str(file.resolve()),
            "dataset": meta["dataset"],
            "classes": list(meta["classes"]),
            "ipc": meta.get("ipc") or len(t["labels"]) // len(meta["classes"]),
            "n_images": len(t["labels"]),
            "iteration": meta.get("iteration"),
            "model": meta["model"],
            "zca": pre.has_zca,
            "soft_labels": logits is not None,
            "preprocess_fingerprint": pre.fingerprint(),
            "pixels_clipped": clipped,
            "files": files,
            "versions": versions(),
        }
        info = {**record, "source": str(file), "pre": pre, "shape": tuple(t["images"].shape), "lr": float(t["lr"])}
        info["train_per_class"] = (meta.get("settings") or {}).get("train_per_class")
        storage.atomic_write_text(tmp / export_files.README, export_files.readme(s.format, info))
        export_files.write_record(tmp, record)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if clipped:
        message = f"{100 * clipped:.2f} % of the pixel values lay outside [0, 1] and were clipped in the PNGs."
        (sink or NullSink()).emit(Message(message, "warning"))
    result = {"out": str(out), "format": s.format, "source": str(file)}
    return result | {k: record[k] for k in ("files", "n_images", "soft_labels", "zca", "pixels_clipped")}


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` is moved aside first and deleted last."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except OSError as e:
        if old is not None:
            os.rename(old / out.name, out)  # put the previous export back
            shutil.rmtree(old, ignore_errors=True)
        raise StorageError(f"Cannot write {out}: {e.strerror or e}. Choose a writable --out.") from e
    with contextlib.suppress(OSError):  # make the rename durable
        storage.fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
