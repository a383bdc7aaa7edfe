"""Device names: the settings and ``resolve_device`` accept and refuse the same ones; ``--host-memory`` on the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from dpd_cli.cli.app import app
from dpd_cli.config.settings import MPS_REFUSED, resolve
from dpd_cli.errors import DeviceError, SettingsError
from dpd_cli.recipes.runtime import resolve_device

MPS_MESSAGE = (
    "mps is not supported: Apple's MPS backend has no float64, and dpd builds float64 tensors on the device "
    "(for example to total the pruning counts per layer). Use --device cpu; on a Mac, --device auto picks the CPU."
)


def test_mps_refused_by_resolve_device():
    assert MPS_REFUSED == MPS_MESSAGE
    with pytest.raises(DeviceError) as info:
        resolve_device("mps")
    assert str(info.value) == f"--device {MPS_MESSAGE}"


@pytest.mark.parametrize("command", ["experts", "distill", "evaluate"])
def test_mps_refused_by_the_settings(command):
    with pytest.raises(SettingsError) as info:
        resolve(command, {"device": "MPS"}, env={})
    assert f"--device: {MPS_MESSAGE}" in str(info.value)


def test_mps_refused_on_the_command_line(monkeypatch):
    monkeypatch.delenv("DPD_DEBUG", raising=False)
    r = CliRunner().invoke(app, ["distill", "--device", "mps"])
    assert r.exit_code == 2, r.output
    assert (
        "--device: mps is not supported: Apple's MPS backend has no float64" in r.output and "Traceback" not in r.output
    )


def test_unknown_device_refused_by_resolve_device():
    """A library caller passing a name the settings would refuse gets an error, not the CPU."""
    with pytest.raises(DeviceError) as info:
        resolve_device("tpu")
    assert str(info.value) == "--device tpu: unknown device; use auto, cpu, cuda or cuda:N."
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_never_picks_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


_APPLY = """
import sys, torch
from dpd_cli.recipes.runtime import set_host_memory
print(set_host_memory(sys.argv[1], torch.device("cpu")), set_host_memory(sys.argv[1], torch.device("cpu")))
"""


def test_host_memory_is_applied_once_per_process():
    """In fresh processes: ``reuse`` is applied by the first call only; ``system`` changes nothing."""
    out = {}
    for mode in ("reuse", "system"):
        run = subprocess.run([sys.executable, "-c", _APPLY, mode], capture_output=True, text=True, check=True)
        out[mode] = run.stdout.split("\n")[0]
    assert out == {"reuse": "reuse None", "system": "None None"}


def test_host_memory_leaves_gpu_runs_alone():
    from dpd_cli.recipes.runtime import set_host_memory

    assert set_host_memory("reuse", torch.device("cuda")) is None
    assert set_host_memory("system", torch.device("cpu")) is None
