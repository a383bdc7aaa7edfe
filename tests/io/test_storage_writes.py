"""Storage writes: the streamed safetensors writer, in-place appends, folder syncs, closing files.

The writer is checked against safetensors' own: both files must read back the same through
``safetensors.torch.load_file`` and ``safe_open`` (tensors bit for bit, dtypes, shapes, metadata).
Appends are checked against the kernel's behaviour on a full disk: a write that gets part of its
bytes in and then fails. tests/cli/test_disk_full.py does the same on a real full file system.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import tracemalloc

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from dpd_cli.errors import StorageError
from dpd_cli.io import storage

# ----------------------------------------------------------------------------------------------
# save_tensors: the safetensors format, written without a serialised copy


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {
        "f32": torch.randn(3, 5, generator=g),
        "f64_scalar": torch.tensor(0.1, dtype=torch.float64),  # 0-d
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.arange(-3, 4),
        "i32_empty": torch.zeros(0, dtype=torch.int32),  # empty
        "i16": torch.tensor([-(2**15), 2**15 - 1], dtype=torch.int16),
        "i8": torch.tensor([[-128], [127]], dtype=torch.int8),
        "u8_empty_3d": torch.zeros(3, 0, 2, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "u8": torch.arange(256, dtype=torch.uint8).view(16, 16),
        "f32_nan_inf": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]),
        "f32_transposed": torch.randn(4, 3, generator=g).T,  # not contiguous: made so before saving
        "z_f32_scalar": torch.tensor(2.5),
        "a_odd_length_u8": torch.arange(5, dtype=torch.uint8),  # 5 bytes before 8-byte tensors unless sorted
    }
    t["f8"] = torch.randn(5, generator=g).to(torch.float8_e4m3fn)
    t["c64"] = torch.randn(3, generator=g, dtype=torch.complex64)
    return t


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes: compares NaNs, -0.0 and float8 exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("meta", [{}, {"note": "x", "nested": {"a": [1, 2.5]}, "text": 'ünïcode ✓ "quoted"'}])
def test_streamed_file_reads_back_as_safetensors_own(tmp_path, meta):
    tensors = _tensors()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    storage.save_tensors(ours, tensors, "dpd.checkpoint", meta)
    theirs.write_bytes(
        st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=storage._encode_meta("dpd.checkpoint", meta))
    )
    blob = ours.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    # The digest dpd records is BLAKE2b-128 of the file's data section (every byte after the header).
    digest = hashlib.blake2b(blob[8 + n :], digest_size=16).hexdigest()

    a, b = load_file(str(ours)), load_file(str(theirs))
    assert set(a) == set(b) == set(tensors)
    for k in tensors:
        assert a[k].dtype == b[k].dtype == tensors[k].dtype, k
        assert a[k].shape == b[k].shape == tensors[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])) and torch.equal(_bits(a[k]), _bits(tensors[k])), k
    with safe_open(str(ours), "pt") as fa, safe_open(str(theirs), "pt") as fb:
        assert fa.metadata().pop(storage.DIGEST_KEY) == json.dumps(digest)
        assert {k: v for k, v in fa.metadata().items() if k != storage.DIGEST_KEY} == fb.metadata()
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in tensors:
            assert torch.equal(_bits(fa.get_tensor(k)), _bits(fb.get_tensor(k))), k
            if tensors[k].dim() >= 1 and tensors[k].shape[0] > 1:
                assert torch.equal(_bits(fa.get_slice(k)[1:2]), _bits(fb.get_slice(k)[1:2])), k
    # dpd's own strict reader agrees, metadata decoded from JSON
    loaded, m = storage.load_tensors(ours, "dpd.checkpoint")
    assert {
        k: v for k, v in m.items() if k not in ("format", "format_version", "dpd_version", storage.DIGEST_KEY)
    } == meta
    assert m[storage.DIGEST_KEY] == digest
    other = theirs.read_bytes()
    assert len(blob) - 8 - n == len(other) - 8 - struct.unpack("<Q", other[:8])[0]  # same amount of data


def test_streamed_layout_is_aligned_and_packed(tmp_path):
    p = tmp_path / "t.safetensors"
    storage.save_tensors(p, _tensors(), "dpd.checkpoint")
    blob = p.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0 and blob[8:9] == b"{"
    header = json.loads(blob[8 : 8 + n])
    header.pop("__metadata__")
    spans = sorted(e["data_offsets"] for e in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(blob) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # back to back, no gap, no overlap
    sizes = {"F64": 8, "I64": 8, "C64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}
    for name, e in header.items():
        assert e["data_offsets"][0] % sizes.get(e["dtype"], 1) == 0, name  # every tensor starts aligned


def test_save_tensors_holds_no_serialised_copy(tmp_path):
    """Saving a 32 MB tensor allocates well under 1 MB in Python (safetensors.torch.save makes 32 MB bytes)."""
    big = torch.randn(8 * 1024 * 1024)
    storage.save_tensors(tmp_path / "warm.safetensors", {"x": torch.zeros(4)}, "dpd.trajectory")  # imports, caches
    tracemalloc.start()
    try:
        storage.save_tensors(tmp_path / "big.safetensors", {"trajectory": big}, "dpd.trajectory", {"epochs": 1})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak
    assert torch.equal(load_file(str(tmp_path / "big.safetensors"))["trajectory"], big)


def test_sparse_tensor_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="cannot save 's': torch.sparse_coo tensors are not supported"):
        storage.save_tensors(tmp_path / "s.safetensors", {"s": torch.eye(2).to_sparse()}, "dpd.checkpoint")
    assert list(tmp_path.iterdir()) == []


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
    assert (
        str(info.value)
        == f"No space left on the device while writing {p}. Free some space and rerun (add --resume where it applies)."
    )
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
    assert (
        str(info.value)
        == f"Cannot write {tmp_path / 'm.jsonl'}: Permission denied. Choose a writable output folder (--out) or fix its permissions."
    )


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


# ----------------------------------------------------------------------------------------------
# TensorFile.close releases the memory map


def _mapped(path) -> int:
    with open("/proc/self/maps") as f:
        return sum(str(path) in line for line in f)


def test_tensor_file_close_unmaps(tmp_path):
    p = tmp_path / "traj.safetensors"
    traj = torch.arange(12, dtype=torch.float32).view(4, 3)
    storage.save_tensors(p, {"trajectory": traj}, "dpd.trajectory")
    f = storage.TensorFile(p, "dpd.trajectory")
    rows = f.rows("trajectory", [1, 3])
    assert _mapped(p) >= 1
    del rows  # a tensor read from the file keeps its pages alive; once gone, close() unmaps
    f.close()
    assert _mapped(p) == 0
    f.close()  # twice is fine
    with pytest.raises(ValueError, match="was closed"):
        f.rows("trajectory", [0])


def test_rows_read_before_close_stay_valid(tmp_path):
    p = tmp_path / "traj.safetensors"
    traj = torch.arange(12, dtype=torch.float32).view(4, 3)
    storage.save_tensors(p, {"trajectory": traj}, "dpd.trajectory")
    with storage.TensorFile(p, "dpd.trajectory") as f:
        rows = f.rows("trajectory", [0, 2])
        whole = f.get("trajectory")
    assert torch.equal(rows, traj[[0, 2]]) and torch.equal(whole, traj)
