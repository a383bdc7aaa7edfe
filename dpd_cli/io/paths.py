"""Default locations, from platformdirs; every one can be overridden by flag, env or config."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["data_root", "cache_root", "experts_root"]

_APP = "dpd"


def data_root() -> Path:
    """Where downloaded datasets go (``DPD_DATA_ROOT`` overrides)."""
    env = os.environ.get("DPD_DATA_ROOT")
    return Path(env) if env else Path(platformdirs.user_cache_dir(_APP)) / "datasets"


def cache_root() -> Path:
    """Decoded-image caches (``DPD_CACHE_ROOT`` overrides)."""
    env = os.environ.get("DPD_CACHE_ROOT")
    return Path(env) if env else Path(platformdirs.user_cache_dir(_APP)) / "decoded"


def experts_root() -> Path:
    """Root of expert trajectories, ``<root>/<dataset>/<model tag>/`` (``DPD_EXPERTS_ROOT`` overrides)."""
    env = os.environ.get("DPD_EXPERTS_ROOT")
    return Path(env) if env else Path(platformdirs.user_data_dir(_APP)) / "experts"
