"""Storage: safetensors round trips, validation of foreign/broken files, atomic writes, locks."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from dpd_cli import __version__
from dpd_cli.errors import OutputExistsError, StorageError
from dpd_cli.io import storage
from dpd_cli.io.storage import (
    TensorFile,
    atomic_write,
    atomic_write_text,
    load_tensors,
    lock_dir,
    lock_holder,
    read_header,
    save_tensors,
)


def _save(path, fmt="dpd.synthetic", meta=None):
    tensors = {
        "images": torch.randn(4, 1, 3, 3),
        "labels": torch.arange(4),
        "lr": torch.tensor(0.01, dtype=torch.float64),
    }
    save_tensors(
        path, tensors, fmt, meta if meta is not None else {"dataset": "cifar10", "n": 3, "nested": {"a": [1, 2.5]}}
    )
    return tensors


def _raw_header(path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _write_with_header(path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


# ----------------------------------------------------------------------------------------------
# Round trip


def test_save_load_round_trip(tmp_path):
    p = tmp_path / "sub" / "s.safetensors"  # the folder is created
    tensors = _save(p)
    loaded, meta = load_tensors(p, "dpd.synthetic")
    assert set(loaded) == set(tensors)
    for k in tensors:
        assert torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype
    assert meta["dataset"] == "cifar10" and meta["n"] == 3 and meta["nested"] == {"a": [1, 2.5]}
    assert meta["format"] == "dpd.synthetic"
    assert meta["format_version"] == str(storage.FORMAT_VERSIONS["dpd.synthetic"])
    assert meta["dpd_version"] == __version__


def test_metadata_on_disk_is_text(tmp_path):
    p = tmp_path / "s.safetensors"
    _save(p)
    header, meta = read_header(p)
    assert set(header) == {"images", "labels", "lr"}
    assert header["images"]["shape"] == [4, 1, 3, 3]
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["nested"]) == {"a": [1, 2.5]}


def test_save_non_contiguous_and_grad_tensors(tmp_path):
    x = torch.randn(3, 4, requires_grad=True)
    p = tmp_path / "t.safetensors"
    save_tensors(p, {"t": x.T, "y": x * 2}, "dpd.checkpoint")
    loaded, _ = load_tensors(p, "dpd.checkpoint")
    assert torch.equal(loaded["t"], x.detach().T) and not loaded["y"].requires_grad


def test_reserved_metadata_key_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, "dpd.synthetic", {"format": "x"})
    assert not (tmp_path / "x.safetensors").exists()


def test_required_tensors(tmp_path):
    p = tmp_path / "s.safetensors"
    _save(p)
    load_tensors(p, "dpd.synthetic", required={"images": (torch.float32, 4), "labels": (torch.int64, None)})
    with pytest.raises(StorageError, match=r"lacks the tensor 'alpha'"):
        load_tensors(p, "dpd.synthetic", required={"alpha": (torch.float32, 0)})
    with pytest.raises(
        StorageError,
        match=r"tensor 'images' is torch.float32 with shape \(4, 1, 3, 3\); expected torch.float32 with 2 dimensions",
    ):
        load_tensors(p, "dpd.synthetic", required={"images": (torch.float32, 2)})


# ----------------------------------------------------------------------------------------------
# Foreign and future files


def test_wrong_format_refused(tmp_path):
    p = tmp_path / "t.safetensors"
    _save(p, fmt="dpd.trajectory")
    with pytest.raises(StorageError) as info:
        load_tensors(p, "dpd.synthetic")
    assert str(info.value) == f"{p} is a 'dpd.trajectory' file; expected a 'dpd.synthetic' file. Check the path."
    with pytest.raises(StorageError):
        TensorFile(p, "dpd.checkpoint")
    load_tensors(p)  # fmt=None accepts any


def test_plain_safetensors_file_refused(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(StorageError, match="is not a file written by dpd; expected a 'dpd.synthetic' file"):
        load_tensors(p, "dpd.synthetic")


def test_future_format_version_refused(tmp_path):
    p = tmp_path / "s.safetensors"
    _save(p)
    header, body = _raw_header(p)
    header["__metadata__"]["format_version"] = "7"
    _write_with_header(p, header, body)
    with pytest.raises(StorageError) as info:
        load_tensors(p, "dpd.synthetic")
    msg = str(info.value)
    assert "format version 7" in msg and "reads version 1" in msg and str(p) in msg


def test_bad_json_metadata_refused(tmp_path):
    p = tmp_path / "s.safetensors"
    _save(p)
    header, body = _raw_header(p)
    header["__metadata__"]["dataset"] = "{not json"
    _write_with_header(p, header, body)
    with pytest.raises(StorageError, match="metadata entry 'dataset' is not valid JSON"):
        load_tensors(p, "dpd.synthetic")


# ----------------------------------------------------------------------------------------------
# Broken files: always StorageError, never another exception


def test_truncated_file(tmp_path):
    p = tmp_path / "s.safetensors"
    _save(p)
    blob = p.read_bytes()
    for cut in (len(blob) - 1, len(blob) - 20, 40, 9, 7, 1):
        p.write_bytes(blob[:cut])
        with pytest.raises(StorageError, match=str(p)):
            load_tensors(p, "dpd.synthetic")
        with pytest.raises(StorageError):
            TensorFile(p)


def test_padded_file(tmp_path):
    p = tmp_path / "s.safetensors"
    _save(p)
    p.write_bytes(p.read_bytes() + b"\0" * 8)
    with pytest.raises(StorageError, match="truncated or padded"):
        load_tensors(p)


def test_zero_length_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    with pytest.raises(StorageError) as info:
        load_tensors(p)
    assert str(info.value) == f"{p} is empty or truncated (0 bytes): not a safetensors file."


def test_random_bytes(tmp_path):
    g = torch.Generator().manual_seed(1)
    p = tmp_path / "noise.safetensors"
    for size in (8, 16, 100, 4096):
        p.write_bytes(bytes(torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8).tolist()))
        with pytest.raises(StorageError):
            load_tensors(p)


def test_small_header_length_with_garbage(tmp_path):
    p = tmp_path / "g.safetensors"
    for header in (
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
        b'"text"',
        b'{"a": 1}',
        b'{"a": {"dtype": "F32"}}',
        b'{"__metadata__": {"k": 1}}',
    ):
        p.write_bytes(struct.pack("<Q", len(header)) + header)
        with pytest.raises(StorageError):
            load_tensors(p)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [1], "data_offsets": [0]},
        {"dtype": "F32", "shape": [1], "data_offsets": "ab"},
        {"dtype": "F32", "shape": [1], "data_offsets": None},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, "x"]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, -4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]},
        {"dtype": "F32", "shape": [100], "data_offsets": [0, 4]},
        {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e30]},
        [0, 4],
    ],
)
def test_malformed_tensor_entry(tmp_path, entry):
    p = tmp_path / "m.safetensors"
    _write_with_header(p, {"a": entry}, b"\0" * 4)
    with pytest.raises(StorageError):
        load_tensors(p)
    with pytest.raises(StorageError):
        TensorFile(p)


def test_header_length_too_large(tmp_path):
    p = tmp_path / "big.safetensors"
    p.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(StorageError, match="header length 1000000000000 does not fit a 10-byte file"):
        load_tensors(p)
    p.write_bytes(struct.pack("<Q", 0) + b"{}")
    with pytest.raises(StorageError, match="header length 0"):
        load_tensors(p)


def test_missing_and_folder(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        load_tensors(tmp_path / "nope.safetensors")
    with pytest.raises(StorageError, match="is a folder"):
        load_tensors(tmp_path)


# ----------------------------------------------------------------------------------------------
# Lazy reads


def test_tensor_file_rows(tmp_path):
    p = tmp_path / "traj.safetensors"
    traj = torch.arange(6 * 5, dtype=torch.float32).view(6, 5)
    save_tensors(p, {"trajectory": traj}, "dpd.trajectory", {"epochs": 5})
    with TensorFile(p, "dpd.trajectory") as f:
        assert f.shape("trajectory") == (6, 5)
        assert f.meta["epochs"] == 5
        assert torch.equal(f.rows("trajectory", [3, 5]), traj[[3, 5]])
        assert torch.equal(f.rows("trajectory", [0]), traj[:1])
        assert torch.equal(f.rows("trajectory", [4, 1, 4]), traj[[4, 1, 4]])
        assert torch.equal(f.get("trajectory"), traj)


# ----------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_write_replaces(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.txt"]
    assert oct(p.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_atomic_write_exception_keeps_old_file_and_no_temp(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(p, "w") as f:
            f.write("partial new content")
            raise RuntimeError("boom")
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.txt"]


def test_atomic_write_exception_on_new_file(tmp_path):
    p = tmp_path / "new.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(p) as f:
            f.write(b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_unwritable_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="Cannot write"):
        atomic_write_text(blocker / "sub" / "f.txt", "x")


def test_save_tensors_failure_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "s.safetensors"
    _save(p)
    before = p.read_bytes()

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(StorageError, match="No space left on the device"):
        _save(p, meta={"other": 1})
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["s.safetensors"]


# ----------------------------------------------------------------------------------------------
# Locks


def test_lock_holder_ignores_what_an_earlier_holder_recorded(tmp_path):
    """Shared holders (torchrun ranks) record nothing: the pid of a process that is gone names nobody."""
    (tmp_path / ".lock").write_text("999999999 dpd distill\n")
    assert lock_holder(tmp_path) is None
    with lock_dir(tmp_path, "a run", shared=True):
        assert lock_holder(tmp_path) == "another dpd process"


def test_lock_dir_second_acquisition_refused(tmp_path):
    folder = tmp_path / "run"
    with lock_dir(folder, "a run", holder="dpd distill"):
        assert (folder / ".lock").read_text() == f"{os.getpid()} dpd distill\n"
        assert lock_holder(folder) == f"dpd distill (pid {os.getpid()})"
        with pytest.raises(OutputExistsError) as info:
            with lock_dir(folder, "a run"):
                pass
        assert str(info.value) == (
            f"Another dpd process is writing a run in {folder}. Wait for it to finish, or choose another --out."
        )
    # released on exit: can be taken again
    assert lock_holder(folder) is None
    with lock_dir(folder, "a run"):
        pass


def test_lock_dir_released_on_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with lock_dir(tmp_path, "experts"):
            raise RuntimeError("x")
    with lock_dir(tmp_path, "experts"):
        pass
