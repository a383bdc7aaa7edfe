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
from dpd_cli.errors import OutputExistsError, StorageError
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
                f"{self.run_dir} already holds a run ({', '.join(existing)}). Continue it with --resume, start it over with "
                "--force, or choose another --out."
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

    def newest_state(self, check, skipped=None) -> tuple[dict[str, torch.Tensor], dict]:
        """The newest checkpoint that loads, after ``check(path, tensors, meta)`` (which raises to refuse it).

        ``skipped(message)`` is told about each newer checkpoint that did not load (damaged), when an older one does.

        Raises:
            StorageError: No checkpoint loads.
        """
        errors = []
        for path in self.checkpoints():
            try:
                t, meta = synthetic_file.load(path)
            except StorageError as e:
                errors.append(str(e))
                continue
            check(path, t, meta)
            for error in errors if skipped is not None else []:
                skipped(f"{error} Resuming from the previous checkpoint that loads, {path.name}.")
            return t, meta
        raise StorageError(
            f"No loadable checkpoint in {self.run_dir / layout.CHECKPOINTS}: {' '.join(errors)} "
            "Start over with --force."
        )
