"""Default locations, from platformdirs; every one can be overridden by flag, env or config."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def _root(env: str, base: str, name: str) -> Path:
    return Path(os.environ[env]) if os.environ.get(env) else Path(base) / name


def data_root() -> Path:
    """Where downloaded datasets go (``DPD_DATA_ROOT`` overrides)."""
    return _root("DPD_DATA_ROOT", platformdirs.user_cache_dir("dpd"), "datasets")


def cache_root() -> Path:
    """Decoded-image caches (``DPD_CACHE_ROOT`` overrides)."""
    return _root("DPD_CACHE_ROOT", platformdirs.user_cache_dir("dpd"), "decoded")


def experts_root() -> Path:
    """Root of expert trajectories, ``<root>/<dataset>/<model tag>/`` (``DPD_EXPERTS_ROOT`` overrides)."""
    return _root("DPD_EXPERTS_ROOT", platformdirs.user_data_dir("dpd"), "experts")
