"""Folder locks: file systems without locks, and torchrun ranks against a plain run.

``flock`` locks belong to open file descriptions, so two ``lock_dir`` calls in one process
conflict exactly as two processes do; one test also holds a rank's locks from a real second
process while plain and torchrun-style ``dpd experts`` runs try the same folder.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from dpd_cli.cli.app import app
from dpd_cli.errors import OutputExistsError, StorageError
from dpd_cli.io import storage
from tests.cli.conftest import TINY

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock semantics of Linux")


def dpd(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ----------------------------------------------------------------------------------------------
# File systems that do not do locks


def _no_locks(monkeypatch, err: int) -> None:
    def flock(fd, op):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(storage.fcntl, "flock", flock)


@pytest.mark.parametrize("err", [errno.ENOLCK, errno.EOPNOTSUPP], ids=["ENOLCK", "EOPNOTSUPP"])
def test_file_system_without_locks_is_a_user_error(tmp_path, monkeypatch, err):
    _no_locks(monkeypatch, err)
    with pytest.raises(StorageError) as info:
        with storage.lock_dir(tmp_path / "run", "a run"):
            pass
    assert str(info.value) == (
        f"Cannot lock {tmp_path / 'run' / '.lock'}: its file system does not support file locks ({os.strerror(err)}; NFS without "
        "a lock service and some parallel file systems lack them). dpd locks every folder it writes so that two processes never write the same "
        "files. Use a folder on a local disk: choose it with --out (for dpd evaluate, copy the run there first)."
    )


@pytest.mark.parametrize("err", [errno.ENOLCK, errno.EOPNOTSUPP], ids=["ENOLCK", "EOPNOTSUPP"])
def test_experts_on_a_file_system_without_locks_exits_2(tmp_path, monkeypatch, err):
    monkeypatch.delenv("DPD_DEBUG", raising=False)
    _no_locks(monkeypatch, err)
    out = tmp_path / "ex"
    r = dpd("experts", "--num", "1", "--epochs", "1", "--out", out, "--quiet", *TINY)
    assert r.exit_code == 2, r.output
    assert (
        f"Error: Cannot lock {out / '.lock'}: its file system does not support file locks ({os.strerror(err)}"
        in r.output
    )
    assert "Use a folder on a local disk: choose it with --out" in r.output
    assert "Traceback" not in r.output
    assert not list(out.glob("expert_*"))


def test_other_flock_errors_are_user_errors(tmp_path, monkeypatch):
    _no_locks(monkeypatch, errno.EIO)
    with pytest.raises(StorageError) as info:
        with storage.lock_dir(tmp_path, "a run"):
            pass
    assert str(info.value) == f"Cannot lock {tmp_path / '.lock'}: Input/output error. Check the output folder."


def test_lock_survives_a_full_disk(tmp_path, monkeypatch):
    """Writing the holder's pid is informative only: a full disk fails the first real write instead."""
    real = os.write

    def full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(storage.os, "write", full)
    with storage.lock_dir(tmp_path, "a run"):
        with pytest.raises(OutputExistsError):  # and it is held
            with storage.lock_dir(tmp_path, "a run"):
                pass


# ----------------------------------------------------------------------------------------------
# lock_shard: torchrun ranks share a folder, a plain run does not


def test_ranks_share_the_folder_and_keep_a_plain_run_out(tmp_path):
    folder = tmp_path / "ex"
    with storage.lock_shard(folder, "experts", 0, 2), storage.lock_shard(folder, "experts", 1, 2):
        with pytest.raises(OutputExistsError) as info:  # a plain run
            with storage.lock_shard(folder, "experts", 0, 1):
                pass
        assert (
            str(info.value)
            == f"Another dpd process is writing experts in {folder}. Wait for it to finish, or choose another --out."
        )
        with pytest.raises(OutputExistsError):  # the same rank of a second job
            with storage.lock_shard(folder, "experts", 1, 2):
                pass
    assert sorted(p.name for p in folder.iterdir()) == [".lock", ".rank0.lock", ".rank1.lock"]
    with storage.lock_shard(folder, "experts", 0, 1):  # all released
        with pytest.raises(OutputExistsError):  # and now a rank is kept out
            with storage.lock_shard(folder, "experts", 1, 2):
                pass


def test_evaluate_rank_lock_name(tmp_path):
    """``.eval.json.lock`` keeps the rank lock name dpd evaluate has always used."""
    with storage.lock_shard(tmp_path, "an evaluation", 3, 4, ".eval.json.lock"):
        assert sorted(p.name for p in tmp_path.iterdir()) == [".eval.json.lock", ".eval.json.rank3.lock"]
        with pytest.raises(OutputExistsError):
            with storage.lock_shard(tmp_path, "an evaluation", 0, 1, ".eval.json.lock"):
                pass


# What rank 0 of a 2-process job holds, as docs/formats.md describes it (plain fcntl: no torch import).
HOLD_RANK = textwrap.dedent("""
    import fcntl, os, sys
    folder = sys.argv[1]
    shared = os.open(os.path.join(folder, ".lock"), os.O_CREAT | os.O_RDWR)
    fcntl.flock(shared, fcntl.LOCK_SH | fcntl.LOCK_NB)
    mine = os.open(os.path.join(folder, ".rank0.lock"), os.O_CREAT | os.O_RDWR)
    fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes stdin
""")


def test_plain_experts_run_is_refused_while_a_torchrun_rank_writes(tmp_path, monkeypatch):
    """Rank 0 of a 2-process job, in another process, holds the folder; its temp file is in use.

    The lock files are the ones ``storage.lock_shard`` takes (checked in the test above); rank 1
    runs the real code in this process, alongside.
    """
    monkeypatch.delenv("DPD_DEBUG", raising=False)
    out = tmp_path / "ex"
    out.mkdir()
    rank0_temp = out / ".expert_00000.safetensors.k3j2.tmp"  # rank 0's trajectory being written
    rank0_temp.write_bytes(b"being written")
    args = ["experts", "--num", "2", "--epochs", "1", "--out", out, "--quiet", *TINY]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_RANK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"

        r = dpd(*args)  # a plain run: refused, and it touches nothing
        assert r.exit_code == 2, r.output
        assert (
            f"Error: Another dpd process is writing experts in {out}. Wait for it to finish, or choose another --out."
            in r.output
        )
        assert rank0_temp.exists() and not (out / "experts.json").exists()

        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        r = dpd(*args)  # rank 1 of the same job works alongside, and leaves rank 0's temp file alone
        assert r.exit_code == 0, r.output
        assert (out / "expert_00001.safetensors").exists() and not (out / "expert_00000.safetensors").exists()
        assert rank0_temp.exists()
        monkeypatch.delenv("RANK")
        monkeypatch.delenv("WORLD_SIZE")
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0

    r = dpd(*args)  # the job is over: a plain run finishes the folder and removes the stale temp
    assert r.exit_code == 0, r.output
    assert (out / "expert_00000.safetensors").exists() and not rank0_temp.exists()


def test_a_rank_is_refused_while_a_plain_run_writes(tmp_path, monkeypatch):
    monkeypatch.delenv("DPD_DEBUG", raising=False)
    out = tmp_path / "ex"
    out.mkdir()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    fd = os.open(out / ".lock", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a plain run holds
        r = dpd("experts", "--num", "2", "--epochs", "1", "--out", out, "--quiet", *TINY)
    finally:
        os.close(fd)
    assert r.exit_code == 2, r.output
    assert f"Error: Another dpd process is writing experts in {out}." in r.output
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
