"""``metrics.jsonl``: one JSON object per distillation iteration (docs/formats.md lists the keys)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dpd_cli.io import storage

__all__ = ["append", "truncate", "read", "last_iteration"]


def append(path: Path, records: list[dict]) -> None:
    """Append records, one line each; a failed append leaves no torn line (``storage.append_text``)."""
    if records:
        storage.append_text(path, "".join(json.dumps(r) + "\n" for r in records))


def truncate(path: Path, iteration: int) -> None:
    """Drop the lines past ``iteration`` (those after the checkpoint a run resumes from) and any torn line."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["iteration"] <= iteration:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    storage.atomic_write_text(path, "".join(k + "\n" for k in kept))


def read(path: Path) -> tuple[list[dict], int, int]:
    """``(records sorted by iteration, lines that are not records, all lines)``; a repeated iteration keeps its last line.

    Raises:
        OSError: The file cannot be read.
    """
    by_it: dict[int, dict] = {}
    bad = total = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            total += 1
            try:
                rec = json.loads(line)
                by_it[int(rec["iteration"])] = rec
            except (ValueError, KeyError, TypeError):
                bad += 1
    return [by_it[i] for i in sorted(by_it)], bad, total


def last_iteration(path: Path, tail_bytes: int = 1 << 16) -> int | None:
    """The iteration of the last complete record, read from the end of the file (``None``: no record there).

    Only the last ``tail_bytes`` are read, so this stays fast for long runs; a torn last line is skipped.

    Raises:
        OSError: The file cannot be read.
    """
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - tail_bytes))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    for line in reversed(lines[1:] if size > tail_bytes else lines):  # the first line of a tail may be cut
        try:
            return int(json.loads(line)["iteration"])
        except (ValueError, KeyError, TypeError):
            continue
    return None
