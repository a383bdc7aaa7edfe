"""``dpd export``: a synthetic set in the files MTT, DATM and other tools read.

The set (a run directory's ``synthetic.safetensors``, that file itself, or a checkpoint) is read with
the strict loader, written into a temporary folder next to ``--out`` and renamed into place, so
``--out`` never holds a partial export: a failure or Ctrl-C removes the temporary folder, and
``--force`` swaps the new folder in before the old one is deleted. The formats are described in
``dpd_cli.artifacts.export`` and docs/formats.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dpd_cli.artifacts import export as export_files
from dpd_cli.artifacts import layout
from dpd_cli.artifacts import synthetic as synthetic_file
from dpd_cli.config.settings import ExportSettings
from dpd_cli.data import Preprocess
from dpd_cli.errors import OutputExistsError, SettingsError, StorageError
from dpd_cli.events import Message, NullSink, Sink
from dpd_cli.io import storage
from dpd_cli.io.provenance import versions
from dpd_cli.models import ModelSpec

__all__ = ["run", "source_file", "label_logits"]


def source_file(target: Path) -> Path:
    """The synthetic set ``target`` names: a run directory's synthetic.safetensors, or the file itself.

    Raises:
        StorageError: Missing target, an experts folder, or a folder that is not a run.
    """
    target = Path(target)
    if not str(target).strip():
        raise StorageError(
            "The target is empty. Give a run directory (from `dpd distill`), its synthetic.safetensors, or a checkpoint."
        )
    if not target.exists():
        raise StorageError(
            f"{target} does not exist. Give a run directory (from `dpd distill`), its synthetic.safetensors, or a checkpoint."
        )
    if not target.is_dir():
        return target
    if (target / "experts.json").is_file() or any(target.glob("expert_*.safetensors")):
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


def label_logits(path: Path, t: dict[str, torch.Tensor], n_classes: int) -> torch.Tensor | None:
    """The set's soft labels (``label_logits``, ``[n, K]`` float32), if it has them, checked.

    Raises:
        StorageError: A ``label_logits`` tensor of another dtype or shape, or not finite.
    """
    v = t.get("label_logits")
    if v is None:
        return None
    shape = (len(t["labels"]), n_classes)
    if v.dtype != torch.float32 or tuple(v.shape) != shape or not torch.isfinite(v).all():
        raise StorageError(
            f"{path}: tensor 'label_logits' is {v.dtype} {tuple(v.shape)}, expected finite float32 {shape}. "
            "It is damaged or was not written by this dpd."
        )
    return v


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

    Raises:
        UserError: No --format or --out; an unreadable set; --out exists without --force, or --force
            would replace something that is not an earlier export.
    """
    s = settings
    sink = sink or NullSink()
    if s.format is None or s.out is None:
        missing = " and ".join(
            x for x, v in (("--format mtt|datm|imagefolder|npz", s.format), ("--out DIR", s.out)) if v is None
        )
        raise SettingsError(f"`dpd export` needs {missing}: which files to write, and the folder to write them to.")
    file = source_file(target)
    t, meta = synthetic_file.load(file)
    spec = ModelSpec.from_dict(meta["model"])
    logits = label_logits(file, t, spec.n_classes)
    out = Path(s.out)
    _check_out(out, file, s.force)
    pre = Preprocess.from_tensors(t)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise StorageError(f"Cannot create {out}: {e.strerror or e}. Choose a writable --out.") from e
    try:
        clipped = None
        if s.format in ("mtt", "datm"):
            files = export_files.write_torch(
                tmp, s.format, t["images"], t["labels"], t["lr"], pre, spec.n_classes, logits
            )
        elif s.format == "npz":
            files = export_files.write_npz(tmp, t, list(meta["classes"]), _plain_meta(meta), logits)
        else:
            if spec.channels not in (1, 3):
                raise SettingsError(
                    f"--format imagefolder writes grayscale or RGB PNGs, and these images have {spec.channels} "
                    "channels. Use --format npz or mtt."
                )
            files, clipped = export_files.write_imagefolder(
                tmp, t["images"], t["labels"], pre, list(meta["classes"]), logits
            )
        settings_run = meta.get("settings") or {}
        info = {
            "source": str(file),
            "dataset": meta["dataset"],
            "classes": list(meta["classes"]),
            "ipc": meta.get("ipc") or len(t["labels"]) // spec.n_classes,
            "shape": tuple(t["images"].shape),
            "lr": float(t["lr"]),
            "pre": pre,
            "soft": logits is not None,
            "dpd": versions()["dpd"],
            "train_per_class": settings_run.get("train_per_class"),
            "clipped": clipped,
        }
        storage.atomic_write_text(tmp / export_files.README, export_files.readme(s.format, info))
        export_files.write_record(
            tmp,
            {
                "export_format": s.format,
                "source": str(file.resolve()),
                "dataset": meta["dataset"],
                "classes": info["classes"],
                "ipc": info["ipc"],
                "n_images": len(t["labels"]),
                "iteration": meta.get("iteration"),
                "model": meta["model"],
                "zca": pre.has_zca,
                "soft_labels": logits is not None,
                "preprocess_fingerprint": pre.fingerprint(),
                "pixels_clipped": clipped,
                "files": files,
                "versions": versions(),
            },
        )
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if clipped:
        sink.emit(
            Message(
                f"{100 * clipped:.2f} % of the pixel values lay outside [0, 1] and were clipped in the PNGs.", "warning"
            )
        )
    return {
        "out": str(out),
        "format": s.format,
        "source": str(file),
        "files": files,
        "n_images": len(t["labels"]),
        "soft_labels": logits is not None,
        "zca": pre.has_zca,
        "pixels_clipped": clipped,
    }


def _plain_meta(meta: dict) -> dict:
    """The set's metadata without the format entries (those describe the safetensors file, not the set)."""
    return {k: v for k, v in meta.items() if k not in ("format", "format_version", "dpd_version")}


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
    with contextlib.suppress(OSError):  # make the rename durable; some file systems cannot sync folders
        fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
