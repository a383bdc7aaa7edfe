"""Storage writes: in-place appends and folder syncs.

Appends are checked against the kernel's behaviour on a full disk: a write that gets part of its
bytes in and then fails. tests/cli/test_disk_full.py does the same on a real full file system.
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from dpd_cli import storage
from dpd_cli.errors import StorageError

# ----------------------------------------------------------------------------------------------
# append_text: in place, cut back on failure


class ShortWriteThenFull:
    """``os.write`` as the kernel behaves on a disk filling up: after ``room`` more bytes, ENOSPC."""

    def __init__(self, monkeypatch, path, room: int):
        self.real, self.path, self.room = os.write, str(path), room
        monkeypatch.setattr(storage.os, "write", self)

    def __call__(self, fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") != self.path:
            return self.real(fd, data)
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self.real(fd, bytes(data[: self.room]))
        self.room -= n
        return n


def test_append_text_cut_back_after_a_short_write(tmp_path, monkeypatch):
    p = tmp_path / "m.jsonl"
    storage.append_text(p, '{"a": 1}\n')
    ShortWriteThenFull(monkeypatch, p, room=5)
    with pytest.raises(StorageError) as info:
        storage.append_text(p, '{"b": 2}\n{"c": 3}\n')
    assert str(info.value) == f"No space left on the device while writing {p}. Free some space and rerun (add --resume where it applies)."
    assert p.read_text() == '{"a": 1}\n'


def test_append_text_completes_after_a_short_write(tmp_path, monkeypatch):
    """A short write with room left is continued, not treated as a failure."""
    p = tmp_path / "m.jsonl"
    real = os.write
    calls = []

    def short(fd, data):
        calls.append(len(data))
        return real(fd, bytes(data[:3]))

    monkeypatch.setattr(storage.os, "write", short)
    storage.append_text(p, "0123456789\n")
    assert p.read_text() == "0123456789\n" and calls == [11, 8, 5, 2]


def test_append_text_removes_the_file_it_created_when_nothing_fits(tmp_path, monkeypatch):
    p = tmp_path / "partial.jsonl"
    ShortWriteThenFull(monkeypatch, p, room=0)
    with pytest.raises(StorageError, match="No space left on the device"):
        storage.append_text(p, "line\n", sync=True)
    assert not p.exists()


def test_append_text_keeps_an_existing_empty_file(tmp_path, monkeypatch):
    p = tmp_path / "metrics.jsonl"
    p.write_text("")
    ShortWriteThenFull(monkeypatch, p, room=2)
    with pytest.raises(StorageError):
        storage.append_text(p, "line\n")
    assert p.exists() and p.read_text() == ""


def test_append_text_failed_fsync_cuts_back(tmp_path, monkeypatch):
    """Delayed allocation reports ENOSPC at fsync: the appended bytes are taken back too."""
    p = tmp_path / "partial.jsonl"
    storage.append_text(p, "first\n", sync=True)

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.os, "fsync", fsync)
    with pytest.raises(StorageError, match="No space left on the device"):
        storage.append_text(p, "second\n", sync=True)
    assert p.read_text() == "first\n"


def test_append_text_cuts_back_only_its_own_bytes(tmp_path, monkeypatch):
    """Another writer's line appended before ours (torchrun ranks share eval.partial.jsonl) is kept."""
    p = tmp_path / "partial.jsonl"
    storage.append_text(p, "mine-1\n")
    real = os.write
    state = {"other": False}

    def other_then_short(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") == str(p):
            if not state["other"]:
                state["other"] = True
                with open(p, "a") as other:  # another process's append lands first
                    other.write("other\n")
                return real(fd, bytes(data[:4]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(storage.os, "write", other_then_short)
    with pytest.raises(StorageError):
        storage.append_text(p, "mine-2\n")
    assert p.read_text() == "mine-1\nother\n"


def test_append_text_read_only_folder(tmp_path, monkeypatch):
    def refuse(path, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(storage.os, "open", refuse)
    with pytest.raises(StorageError) as info:
        storage.append_text(tmp_path / "m.jsonl", "x\n")
    assert str(info.value) == f"Cannot write {tmp_path / 'm.jsonl'}: Permission denied. Choose a writable output folder (--out) or fix its permissions."


# ----------------------------------------------------------------------------------------------
# atomic_write: the folder is synced after the rename


@pytest.fixture
def fsync_log(monkeypatch):
    """Records ("replace", target) and ("fsync", path) in order."""
    log: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        real_replace(src, dst)
        log.append(("replace", str(dst)))

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "replace", replace)
    return log


def test_atomic_write_syncs_the_folder_after_the_rename(tmp_path, fsync_log):
    p = tmp_path / "f.json"
    storage.atomic_write_text(p, "{}")
    assert [e[0] for e in fsync_log] == ["fsync", "replace", "fsync"]
    assert os.path.basename(fsync_log[0][1]).startswith(".f.json.")  # the temp file's data first
    assert fsync_log[1:] == [("replace", str(p)), ("fsync", str(tmp_path))]


def test_atomic_write_syncs_folders_it_created(tmp_path, fsync_log):
    p = tmp_path / "run" / "checkpoints" / "c.bin"
    with storage.atomic_write(p) as f:
        f.write(b"x")
    dirs = [path for kind, path in fsync_log if kind == "fsync"][1:]
    # the new entry, then the entries of checkpoints/ (in run/) and of run/ (in tmp_path)
    assert dirs == [str(tmp_path / "run" / "checkpoints"), str(tmp_path / "run"), str(tmp_path)]


def test_folder_sync_refused_by_the_file_system_is_ignored(tmp_path, monkeypatch):
    real = os.fsync

    def fsync(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    storage.atomic_write_text(tmp_path / "f.txt", "new")
    assert (tmp_path / "f.txt").read_text() == "new"


def test_folder_sync_io_error_is_reported(tmp_path, monkeypatch):
    real = os.fsync

    def fsync(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    with pytest.raises(StorageError) as info:
        storage.atomic_write_text(tmp_path / "f.txt", "new")
    assert str(info.value) == f"Cannot write {tmp_path / 'f.txt'}: Input/output error. Check the output folder."
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # renamed; no temp left
