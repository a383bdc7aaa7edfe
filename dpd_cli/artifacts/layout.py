"""The names of a run directory's files (``dpd distill --out``) and of its checkpoints.

Imports nothing of its siblings, so every artifact module can use it.

::

    settings.json                       resolved settings, versions, experts folder, settings hash
    preprocess.safetensors              the normalisation / ZCA tensors (checkpoints refer to it)
    synthetic.safetensors               the newest synthetic set, standalone (carries its preprocessing)
    checkpoints/ckpt-NNNNNN.safetensors exact-resume state at iteration NNNNNN (ckpt-000000: the initial images)
    metrics.jsonl                       one JSON line per iteration
    prune_frequency.safetensors         per-parameter prune counter
    grid.png                            the synthetic images as a picture
    eval.json, eval.partial.jsonl       dpd evaluate's results (``dpd_cli.artifacts.evaluation``)
    .lock                               held while ``dpd distill`` writes here
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "SETTINGS",
    "PREPROCESS",
    "SYNTHETIC",
    "CHECKPOINTS",
    "METRICS",
    "PRUNE",
    "GRID",
    "EVAL",
    "RUN_FILES",
    "MARKERS",
    "is_run",
    "checkpoint_path",
    "checkpoints",
    "checkpoint_iteration",
    "checkpoints_to_delete",
]

SETTINGS = "settings.json"
PREPROCESS = "preprocess.safetensors"
SYNTHETIC = "synthetic.safetensors"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
PRUNE = "prune_frequency.safetensors"
GRID = "grid.png"
EVAL = "eval.json"
#: What a run directory may hold, in the order ``dpd inspect`` lists it; ``--force`` deletes these.
RUN_FILES = (SETTINGS, PREPROCESS, SYNTHETIC, METRICS, PRUNE, GRID, CHECKPOINTS, EVAL)
#: Any of these makes a folder a run directory.
MARKERS = (SETTINGS, SYNTHETIC, CHECKPOINTS)


def is_run(folder: Path) -> bool:
    return any((Path(folder) / m).exists() for m in MARKERS)


def checkpoint_path(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"ckpt-{iteration:06d}.safetensors"


def checkpoint_iteration(path: Path) -> int | None:
    """The iteration in a checkpoint's file name (``None`` for another name)."""
    stem = Path(path).name.removeprefix("ckpt-").removesuffix(".safetensors")
    return int(stem) if stem.isdigit() and Path(path).name.startswith("ckpt-") else None


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, newest (highest iteration) first."""
    found = [(checkpoint_iteration(p), p) for p in (Path(run_dir) / CHECKPOINTS).glob("ckpt-*.safetensors")]
    return [p for it, p in sorted(((it, p) for it, p in found if it is not None), reverse=True)]


def checkpoints_to_delete(iterations: list[int], keep: str | int, checkpoint_every: int) -> list[int]:
    """Which of a run's checkpoint iterations the keep policy lets go.

    Always kept: checkpoint 0 (the images the run started from) and the newest two (a resume falls
    back to the older one if the newest is damaged). ``keep``: ``"latest"`` keeps nothing else,
    ``"all"`` keeps every checkpoint, an integer N keeps every N-th (the iterations that are multiples
    of N x ``checkpoint_every``).
    """
    if keep == "all":
        return []
    kept = [0, *sorted(iterations, reverse=True)[:2]]
    every = keep * checkpoint_every if isinstance(keep, int) else None
    return [it for it in iterations if it not in kept and not (every is not None and it % every == 0)]
