"""Device names: the settings and ``resolve_device`` accept and refuse the same ones; ``--host-memory`` on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from dpd_cli.cli.app import app
from dpd_cli.recipes.runtime import resolve_device
from dpd_cli.errors import DeviceError, SettingsError
from dpd_cli.config.settings import MPS_REFUSED, resolve

MPS_MESSAGE = ("mps is not supported: Apple's MPS backend has no float64, and dpd builds float64 tensors on the device "
               "(for example to total the pruning counts per layer). Use --device cpu; on a Mac, --device auto picks the CPU.")


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
    assert "--device: mps is not supported: Apple's MPS backend has no float64" in r.output and "Traceback" not in r.output


def test_unknown_device_refused_by_resolve_device():
    """A library caller passing a name the settings would refuse gets an error, not the CPU."""
    with pytest.raises(DeviceError) as info:
        resolve_device("tpu")
    assert str(info.value) == "--device tpu: unknown device; use auto, cpu, cuda or cuda:N."
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_never_picks_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


_FAULTS = """
import resource, sys, torch
from dpd_cli.recipes.runtime import set_host_memory
print(set_host_memory(sys.argv[1], torch.device("cpu")), set_host_memory(sys.argv[1], torch.device("cpu")))
for _ in range(4):  # the heap settles (the first blocks may not fit an aligned request)
    x = torch.ones(16 * 2**20)  # 64 MiB, above glibc's largest mmap threshold
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(16 * 2**20)
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _glibc_without_forced_huge_pages() -> bool:
    try:
        glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            forced = "[always]" in f.read()
    except OSError:
        forced = False
    return glibc and not forced


@pytest.mark.skipif(not _glibc_without_forced_huge_pages(), reason="glibc, without transparent huge pages forced on")
def test_host_memory_reuse_stops_the_page_faults_of_large_blocks():
    """Measured in fresh processes: a freed 64 MiB tensor's pages are reused (reuse) or faulted in again (system)."""
    out = {}
    for mode in ("reuse", "system"):
        run = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        applied, faults = run.stdout.split("\n")[:2]
        out[mode] = (applied, int(faults))
    assert out["reuse"][0] == "reuse None"  # applied once per process
    assert out["system"][0] == "None None"
    pages = 10 * 64 * 2**20 // 4096
    assert out["system"][1] > pages // 2  # every block faulted in afresh, 4 KiB at a time
    # Reused: usually no block in ten lands on fresh pages (0 in 30 processes here), but now and then
    # one or two do (the heap placing an aligned request anew; two seen once in a full test run);
    # with the system's allocator all ten do. Fewer than half keeps the two apart without flaking.
    assert out["reuse"][1] < pages // 2


def test_host_memory_leaves_gpu_runs_alone():
    from dpd_cli.recipes.runtime import set_host_memory

    assert set_host_memory("reuse", torch.device("cuda")) is None
    assert set_host_memory("system", torch.device("cpu")) is None
