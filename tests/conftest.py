"""Fixtures shared by every test: a fixed seed, plain output, and isolated directories."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

# `from tests.helpers import ...` must work under plain `pytest` as well as `python -m pytest`.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(autouse=True)
def _seed_and_isolate(tmp_path, monkeypatch):
    """Seed torch/random and point every dpd root at a fresh temporary folder."""
    random.seed(0)
    torch.manual_seed(0)
    # One intra-op thread: the models here are tiny, and on a busy machine OpenMP's spinning
    # threads make every op orders of magnitude slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("DPD_EXPERTS_ROOT", str(tmp_path / "experts-root"))
    monkeypatch.setenv("DPD_DATA_ROOT", str(tmp_path / "data-root"))
    monkeypatch.setenv("DPD_CACHE_ROOT", str(tmp_path / "cache-root"))
    yield
    torch.set_num_threads(threads)
