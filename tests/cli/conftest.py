"""Fixtures for end-to-end CLI tests: isolated dirs, plain output, tiny settings."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dpd_cli.cli.app import app

#: Flags that make every command tiny: 8-channel ConvNet on 20 images per class.
#: A tiny distillation: 4 iterations of 3 steps at IPC 1, checkpoints every 2.
DISTILL_TINY = "--ipc 1 --iterations 4 --syn-steps 3 --max-start-epoch 2 --expert-epochs 1 --lr-img 10 --lr-lr 1e-8 --checkpoint-every 2".split()

TINY = ["--width", "8", "--depth", "2", "--train-per-class", "20", "--threads", "1"]


def user_error(result, *phrases: str) -> None:
    """Exit code 2, one ``Error:`` paragraph holding ``phrases``, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("Error: ")
    message = " ".join(result.output.split())  # undo Rich's wrapping
    for phrase in phrases:
        assert phrase in message, message


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("DPD_EXPERTS_ROOT", str(tmp_path / "experts-root"))
    monkeypatch.setenv("DPD_DATA_ROOT", str(tmp_path / "data-root"))
    monkeypatch.setenv("DPD_CACHE_ROOT", str(tmp_path / "cache-root"))
    monkeypatch.delenv("DPD_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def dpd():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture
def experts(dpd, tmp_path):
    """Two tiny experts (3 epochs) trained through the CLI into tmp_path/ex."""
    out = tmp_path / "ex"
    r = dpd("experts", "--num", "2", "--epochs", "3", "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    return out
