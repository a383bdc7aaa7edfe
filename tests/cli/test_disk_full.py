"""A real full disk: each command writes to a small tmpfs that fills up at a chosen write.

The test mounts a size-limited tmpfs (root only; skipped otherwise) and, just before dpd writes a
chosen file, grows a filler file until no space is left, so that the kernel itself refuses the
write (partly, for an append that crosses into a new page). Afterwards every file must be exactly
what it was when the disk filled up (the previous complete version, or absent), the command must
exit with 2 and say the disk is full, and once the filler is gone the same command (with
--resume for distill) must finish with the result of an uninterrupted run in an ordinary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpd_cli.artifacts.experts import ExpertSet
from dpd_cli.artifacts.synthetic import load as load_synthetic
from dpd_cli.cli.app import app
from dpd_cli.io import storage
from tests.cli.conftest import TINY

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mounts a Linux tmpfs")

CPU = ["--device", "cpu"]
EXPERTS = ["experts", "--num", "2", "--epochs", "3", *CPU, "--quiet", *TINY]
DISTILL = [
    "--ipc",
    "2",
    "--batch-syn",
    "7",
    "--syn-steps",
    "3",
    "--max-start-epoch",
    "2",
    "--expert-epochs",
    "1",
    "--lr-img",
    "10",
    "--lr-lr",
    "1e-8",
    "--checkpoint-every",
    "2",
    "--iterations",
    "14",
    *CPU,
    "--quiet",
    *TINY,
]
EVALUATE = ["--runs", "2", "--epochs", "2", "--threads", "1", *CPU, "--quiet"]
FULL = "Free some space and rerun (add --resume where it applies)."


def dpd(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


class SmallDisk:
    """A mounted tmpfs with a filler file that can take all of its free space."""

    def __init__(self, root: Path):
        self.root = root
        self.filler = root / "filler"
        self.page = os.statvfs(root).f_frsize  # tmpfs hands out whole pages

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self) -> None:
        with open(self.filler, "ab") as f:
            while self.free_bytes():
                os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, self.free_bytes())
        assert self.free_bytes() == 0

    def empty(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    root = tmp_path / "small"
    root.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield SmallDisk(root)
    finally:
        # Tensors loaded by the test may still map files there: detach lazily if it is busy.
        if subprocess.run(["umount", str(root)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(root)], check=True)


def _files(root: Path, skip: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p != skip}


class FillBefore:
    """Fill the disk just before dpd writes ``name`` for the ``nth`` time, and remember every file then.

    With ``torn``, only an append that would get part of its text into the file's last page and
    then need a new page counts: that is the append the kernel cuts short.
    """

    def __init__(self, monkeypatch, disk: SmallDisk, name: str, nth: int = 1, torn: bool = False):
        self.disk, self.name, self.nth, self.torn = disk, name, nth, torn
        self.seen = 0
        self.before: dict[str, bytes] | None = None
        real_atomic, real_append = storage.atomic_write, storage.append_text

        @contextlib.contextmanager
        def atomic_write(path, mode="wb"):
            self._maybe_fill(Path(path))
            with real_atomic(path, mode) as f:
                yield f

        def append_text(path, text, sync=False):
            self._maybe_fill(Path(path), text)
            return real_append(path, text, sync)

        monkeypatch.setattr(storage, "atomic_write", atomic_write)
        monkeypatch.setattr(storage, "append_text", append_text)

    def _maybe_fill(self, path: Path, text: str | None = None) -> None:
        if path.name != self.name or self.before is not None:
            return
        if self.torn:
            used = path.stat().st_size % self.disk.page if path.exists() else 0
            if not (used and used + len(text.encode()) > self.disk.page):
                return
        self.seen += 1
        if self.seen == self.nth:
            self.before = _files(self.disk.root, self.disk.filler)
            self.disk.fill()

    def assert_nothing_changed(self) -> None:
        """Every file is as it was when the disk filled up: the previous complete version, or absent."""
        assert self.before is not None, f"{self.name} was never written"
        after = _files(self.disk.root, self.disk.filler)
        assert sorted(after) == sorted(self.before)  # no new file, no temp file left
        for name, data in after.items():
            assert data == self.before[name], f"{name} changed"
        for p in self.disk.root.rglob("*.safetensors"):
            storage.load_tensors(p)  # complete files only
        for p in self.disk.root.rglob("*.jsonl"):
            for line in p.read_text().splitlines():
                json.loads(line)  # no torn line


def _refused(r, path: Path) -> None:
    assert r.exit_code == 2, r.output
    assert f"Error: No space left on the device while writing {path}. {FULL}" in r.output
    assert "Traceback" not in r.output


# ----------------------------------------------------------------------------------------------
# Uninterrupted runs in an ordinary folder, to compare with


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "ex"
    r = dpd(*EXPERTS, "--out", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, experts) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    r = dpd("distill", "--experts", experts, *DISTILL, "--out", run)
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture(scope="module")
def reference_eval(tmp_path_factory, reference_run) -> dict:
    run = tmp_path_factory.mktemp("reference") / "run"
    shutil.copytree(reference_run, run)
    r = dpd("evaluate", run, *EVALUATE)
    assert r.exit_code == 0, r.output
    return json.loads((run / "eval.json").read_text())


def _same_run(a: Path, b: Path) -> None:
    ta, _ = load_synthetic(a / "synthetic.safetensors")
    tb, _ = load_synthetic(b / "synthetic.safetensors")
    for k in ("images", "labels", "lr"):
        assert torch.equal(ta[k], tb[k]), k
    pa, _ = storage.load_tensors(a / "prune_frequency.safetensors")
    pb, _ = storage.load_tensors(b / "prune_frequency.safetensors")
    assert torch.equal(pa["counts"], pb["counts"])
    strip = lambda run: [
        {k: v for k, v in json.loads(x).items() if k != "seconds"}
        for x in (run / "metrics.jsonl").read_text().splitlines()
    ]  # noqa: E731
    assert strip(a) == strip(b)


def _same_eval(record: dict, reference: dict) -> None:
    (a,), (b,) = record["results"], reference["results"]
    assert a["accuracies"] == b["accuracies"] and a["seeds"] == b["seeds"] and a["runs"] == b["runs"] == 2


# ----------------------------------------------------------------------------------------------
# experts: the disk fills up while a trajectory is saved


def test_experts_disk_full_while_saving_a_trajectory(disk, experts, monkeypatch):
    out = disk.root / "ex"
    target = out / "expert_00001.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        fill = FillBefore(mp, disk, target.name)
        r = dpd(*EXPERTS, "--out", out)
    _refused(r, target)
    fill.assert_nothing_changed()
    assert (out / "expert_00000.safetensors").exists() and not target.exists()

    disk.fill()  # still full (the removed temp file gave its pages back): refused again, cleanly
    r = dpd(*EXPERTS, "--out", out)
    _refused(r, target)
    fill.assert_nothing_changed()

    disk.empty()
    r = dpd(*EXPERTS, "--out", out)
    assert r.exit_code == 0, r.output
    with ExpertSet(out) as got, ExpertSet(experts) as want:
        assert len(got) == len(want) == 2
        for a, b in zip(got.files, want.files, strict=True):
            assert torch.equal(a.get("trajectory"), b.get("trajectory")), a.path
    assert (
        json.loads((out / "experts.json").read_text())["compat"]
        == json.loads((experts / "experts.json").read_text())["compat"]
    )


# ----------------------------------------------------------------------------------------------
# distill: the disk fills up while a checkpoint, the synthetic set or a metrics line is written


@pytest.mark.parametrize(
    ("name", "nth", "torn"),
    [
        ("ckpt-000004.safetensors", 1, False),
        ("synthetic.safetensors", 4, False),
        ("metrics.jsonl", 1, True),
    ],  # synthetic: written at 0, 2, 4, 6
    ids=["checkpoint", "synthetic", "metrics-line"],
)
def test_distill_disk_full_then_resume(disk, experts, reference_run, name, nth, torn):
    run = disk.root / "run"
    args = ["distill", "--experts", experts, *DISTILL, "--out", run]
    with pytest.MonkeyPatch.context() as mp:
        fill = FillBefore(mp, disk, name, nth, torn)
        r = dpd(*args)
    target = run / "checkpoints" / name if name.startswith("ckpt") else run / name
    _refused(r, target)
    fill.assert_nothing_changed()
    if name == "synthetic.safetensors":  # the checkpoint of that iteration is in place, the set is the one before
        assert load_synthetic(run / "synthetic.safetensors")[1]["iteration"] == 4
        assert (run / "checkpoints" / "ckpt-000006.safetensors").exists()
    if torn:  # the append was cut short by the kernel, then cut back to whole lines
        assert (run / "metrics.jsonl").read_text().endswith("}\n")

    disk.empty()
    r = dpd(*args, "--resume")
    assert r.exit_code == 0, r.output
    _same_run(run, reference_run)
    assert not list(run.rglob("*.tmp"))


# ----------------------------------------------------------------------------------------------
# evaluate: the disk fills up while eval.json or the record of a finished training is written


@pytest.mark.parametrize("name", ["eval.json", "eval.partial.jsonl"])
def test_evaluate_disk_full_then_rerun(disk, reference_run, reference_eval, name):
    run = disk.root / "run"
    shutil.copytree(reference_run, run)
    with pytest.MonkeyPatch.context() as mp:
        fill = FillBefore(mp, disk, name)
        r = dpd("evaluate", run, *EVALUATE)
    _refused(r, run / name)
    fill.assert_nothing_changed()
    assert not (run / "eval.json").exists()
    partial = run / "eval.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 2 if name == "eval.json" else not partial.exists()

    disk.empty()
    r = dpd("evaluate", run, *EVALUATE)
    assert r.exit_code == 0, r.output
    _same_eval(json.loads((run / "eval.json").read_text()), reference_eval)
    assert not partial.exists()
