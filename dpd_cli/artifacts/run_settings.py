"""``settings.json``: what a run directory was started with (written when a run starts; a resume keeps it).

``{"command": "distill", "settings", "settings_hash", "experts_folder", "n_experts", "model",
"validation", "versions"}``; docs/formats.md describes each key.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpd_cli.artifacts.layout import SETTINGS
from dpd_cli.errors import StorageError
from dpd_cli.io import storage

__all__ = ["save", "load", "read"]


def save(run_dir: Path, record: dict) -> None:
    """Write ``RUN/settings.json`` (atomically)."""
    storage.atomic_write_text(Path(run_dir) / SETTINGS, json.dumps(record, indent=2))


def load(run_dir: Path) -> dict:
    """``RUN/settings.json``, checked: a JSON table with a ``settings`` table.

    Raises:
        StorageError: Missing, unreadable or not a dpd settings file.
    """
    path = Path(run_dir) / SETTINGS
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
            raise ValueError("no 'settings' table")
    except (OSError, ValueError, RecursionError) as e:
        raise StorageError(f"{path} is not a readable dpd settings file ({e}).") from None
    return record


def read(run_dir: Path) -> tuple[dict | None, str | None]:
    """``(record, None)``, ``(None, why it is unusable)``, or ``(None, None)`` when there is no settings.json."""
    if not (Path(run_dir) / SETTINGS).exists():
        return None, None
    try:
        return load(run_dir), None
    except StorageError as e:
        return None, str(e)
