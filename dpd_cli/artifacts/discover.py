"""Which folders are run directories or experts folders, and finding them below a folder."""

from __future__ import annotations

from pathlib import Path

from dpd_cli.artifacts import experts as experts_file
from dpd_cli.artifacts import layout

__all__ = ["kind_of", "find"]


def kind_of(folder: Path) -> str | None:
    """``"run"``, ``"experts"`` or ``None`` (any other folder, or not a folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if layout.is_run(folder):
        return "run"
    if experts_file.is_folder(folder):
        return "experts"
    return None


def find(root: Path, depth: int, limit: int | None = None, max_children: int = 1000) -> list[tuple[Path, str]]:
    """Runs and experts folders up to ``depth`` levels below ``root`` (breadth first, by name within a level).

    A folder found is not searched further (a run's ``checkpoints/`` is part of it); hidden folders
    and unreadable ones are skipped, and at most ``max_children`` subfolders of each folder are looked at.

    Returns:
        ``[(folder, kind), ...]``, at most ``limit`` of them.
    """
    found: list[tuple[Path, str]] = []
    level = [Path(root)]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                children = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
            except OSError:
                continue
            for c in children[:max_children]:
                kind = kind_of(c)
                if kind:
                    found.append((c, kind))
                    if limit is not None and len(found) >= limit:
                        return found
                else:
                    nxt.append(c)
        level = nxt
    return found
