"""Everything ``dpd distill`` writes into its run directory, in one place (rank 0 alone writes).

The files are named in ``dpd_cli.artifacts.layout``; each has its own module for its format.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import torch

from dpd_cli.artifacts import evaluation, layout, run_settings
from dpd_cli.artifacts import metrics as metrics_file
from dpd_cli.artifacts import preprocess as preprocess_file
from dpd_cli.artifacts import prune_counts as prune_file
from dpd_cli.artifacts import synthetic as synthetic_file
from dpd_cli.data import Preprocess
from dpd_cli.errors import DamagedError, OutputExistsError, StorageError
from dpd_cli.io import storage
from dpd_cli.io.images import save_grid

__all__ = ["RunWriter"]


class RunWriter:
    """A run directory as ``dpd distill`` writes it.

    Args:
        run_dir: The run directory.
        pre: The run's preprocessing (every tensor file carries it).
        writes: False on the ranks of torchrun other than 0: every method that writes does nothing.
    """

    def __init__(self, run_dir: Path, pre: Preprocess, writes: bool = True):
        self.run_dir = Path(run_dir)
        self.pre = pre
        self.writes = writes

    def checkpoints(self) -> list[Path]:
        return layout.checkpoints(self.run_dir)

    def lock(self, stack: contextlib.ExitStack) -> None:
        """Hold the run directory's lock until ``stack`` closes; delete the temp files of a killed process."""
        if not self.writes:
            return
        stack.enter_context(storage.lock_dir(self.run_dir, "a distillation run", holder="dpd distill"))
        # With the lock held no other process is writing here.
        storage.remove_stale_temps(self.run_dir)
        storage.remove_stale_temps(self.run_dir / layout.CHECKPOINTS)

    def prepare(self, resume: bool, force: bool) -> None:
        """Refuse an existing run unless ``resume`` (its files are this run's: the settings hash was checked) or ``force``."""
        existing = [f for f in layout.RUN_FILES if (self.run_dir / f).exists()]
        if not self.writes or not existing or resume:
            return
        if not force:
            raise OutputExistsError(
                f"{self.run_dir} already holds a run ({', '.join(existing)}). Continue it with --resume, start it over with --force, or choose another --out."
            )
        for f in existing:
            p = self.run_dir / f
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        evaluation.partial_path(self.run_dir / layout.EVAL).unlink(missing_ok=True)

    def recorded_settings_hash(self) -> str | None:
        """The settings hash in ``settings.json``."""
        try:
            return run_settings.load(self.run_dir).get("settings_hash")
        except StorageError as e:
            raise StorageError(f"{e} There is no checkpoint to resume: start over with --force.") from e

    def start(self, settings_record: dict) -> None:
        """A fresh run's first files: its settings and preprocessing; no metrics line yet."""
        if not self.writes:
            return
        metrics_file.truncate(self.run_dir / layout.METRICS, 0)  # lines of a run stopped before checkpoint 0
        preprocess_file.save(self.run_dir / layout.PREPROCESS, self.pre)
        run_settings.save(self.run_dir, settings_record)

    def resumed(self, iteration: int) -> None:
        """Drop the metrics lines past the checkpoint a resume starts from."""
        if self.writes:
            metrics_file.truncate(self.run_dir / layout.METRICS, iteration)

    def record_changes(self, iteration: int, changed: dict) -> None:
        """Record in ``settings.json`` the settings a resume from ``iteration`` changes (``{name: {"from", "to"}}``),
        dropping the changes recorded at or after it (the iterations they applied to are redone)."""
        record, _ = run_settings.read(self.run_dir)
        if not self.writes or record is None:
            return
        old = record.get("changes") or []
        new = [c for c in old if c.get("iteration", 0) < iteration]
        new += [{"iteration": iteration, "setting": k, **c} for k, c in changed.items()]
        if new != old:
            run_settings.save(self.run_dir, {**record, "changes": new})

    def metrics(self, records: list[dict]) -> None:
        if self.writes:
            metrics_file.append(self.run_dir / layout.METRICS, records)

    def save(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], param_layout: list, n_pruned: int) -> Path:
        """The exact-resume checkpoint of ``meta["iteration"]`` (deleting those the keep policy lets go), then
        the standalone synthetic set, the prune counts and the picture of the images.

        ``tensors``: the state (``images``, ``lr``, ``prune_counts``, ...) and ``labels``; ``n_pruned``: how
        many iterations pruned anything.
        """
        iteration, s = meta["iteration"], meta["settings"]
        path = layout.checkpoint_path(self.run_dir, iteration)
        if not self.writes:
            return path
        synthetic_file.save_checkpoint(path, tensors, self.pre, meta)
        kept = {layout.checkpoint_iteration(p): p for p in self.checkpoints()}
        for it in layout.checkpoints_to_delete(list(kept), s["keep_checkpoints"], s["checkpoint_every"]):
            kept[it].unlink(missing_ok=True)
        images, labels, logits = tensors["images"], tensors["labels"], tensors.get("label_logits")
        synthetic_file.save_synthetic(
            self.run_dir / layout.SYNTHETIC, images, labels, tensors["lr"], self.pre, meta, logits
        )
        counts, rule = tensors["prune_counts"], meta["prune_rule"]
        prune_file.save(self.run_dir / layout.PRUNE, counts, param_layout, n_pruned, iteration, rule)
        save_grid(self.pre.invert(images), labels, len(meta["classes"]), self.run_dir / layout.GRID)
        return path

    def reached(self) -> int:
        """The newest iteration ``metrics.jsonl`` records (0: none): how far the run had got."""
        with contextlib.suppress(OSError):
            return metrics_file.last_iteration(self.run_dir / layout.METRICS) or 0
        return 0

    def set_aside_damaged(self) -> list[tuple[Path, str, Path]]:
        """Rename each damaged checkpoint newer than the newest sound one to ``<name>.damaged`` (``.damaged.1``, ...
        if taken), so that a resume neither reads nor overwrites it; ``[(checkpoint, how it is damaged, new path)]``.

        A sound checkpoint's header and tensor data (against its checksum) are checked here; other problems
        (a newer format, another run's file) stop the resume where it loads the file.
        """
        moved = []
        for path in self.checkpoints() if self.writes else []:
            try:
                synthetic_file.check_header(path)
                storage.verify_data(path)
                break
            except DamagedError as e:
                aside, n = path.with_name(f"{path.name}.damaged"), 0
                while aside.exists():  # an earlier one of the same name is kept too
                    n += 1
                    aside = path.with_name(f"{path.name}.damaged.{n}")
                path.rename(aside)
                storage.fsync_dir(path.parent)
                moved.append((path, e.reason, aside))
            except StorageError:
                break
        return moved

    def newest_state(self, check) -> tuple[dict[str, torch.Tensor], dict]:
        """The newest checkpoint, loaded, after ``check(path, tensors, meta)`` (which raises to refuse it).

        Raises:
            StorageError: It does not load (``set_aside_damaged`` moves damaged ones aside first).
        """
        path = self.checkpoints()[0]
        t, meta = synthetic_file.load(path)
        check(path, t, meta)
        return t, meta
