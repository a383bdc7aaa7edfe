"""Provenance: the versions recorded with every file dpd writes."""

from __future__ import annotations

import platform
import sys

import safetensors
import torch

from dpd_cli import __version__

__all__ = ["versions"]


def versions() -> dict[str, str]:
    return {
        "dpd": __version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
