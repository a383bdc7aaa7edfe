"""All file I/O: safetensors with validated metadata, atomic writes, locks, lazy slices.

Every format written here carries ``format`` and ``format_version`` in its metadata; other metadata
values are JSON. Loading validates the header before any tensor is touched and never unpickles anything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import struct
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import _TYPES, load_file, save

from dpd_cli import __version__
from dpd_cli.errors import DamagedError, OutputExistsError, StorageError

#: The version of each format this release writes.
FORMAT_VERSIONS = {
    "dpd.trajectory": 1,
    "dpd.synthetic": 2,
    "dpd.checkpoint": 2,
    "dpd.prune_counts": 1,
    "dpd.imagecache": 1,
    "dpd.preprocess": 1,
}
#: The versions of each format this release reads (older files stay usable).
READABLE_VERSIONS = {fmt: (v,) for fmt, v in FORMAT_VERSIONS.items()} | {
    "dpd.checkpoint": (1, 2),
    "dpd.synthetic": (1, 2),
}


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # mkstemp creates 0600; outputs get the usual mode
DIR_MODE = 0o777 & ~_current_umask()  # mkdtemp creates 0700; an output folder gets mkdir's mode
_MAX_HEADER = 64 * 1024 * 1024  # bytes; safetensors' own limit is 100 MB
_WRITE_CHUNK = 64 * 1024 * 1024  # bytes per write call
_RESERVED = ("format", "format_version", "dpd_version")
_DTYPES = {dtype: name for name, dtype in _TYPES.items()}  # torch.float32 -> "F32", as safetensors names them

#: The metadata key holding the digest of a file's tensor data: every byte after the 8-byte header
#: length and the header. BLAKE2b with a 16-byte digest: in the standard library, faster than SHA-256
#: (about 1 GB/s per core) and, at 128 bits, without a collision in practice for accidental damage
#: (it guards against bit rot and broken copies, not against someone forging a file).
DIGEST_KEY = "data_blake2b"
_DIGEST_SIZE = 16
_DIGEST_RE = re.compile(r"[0-9a-f]{32}")
_VERIFY_CHUNK = 16 * 1024 * 1024  # bytes read at a time: a big file is never held in memory to verify it
#: Files verified in this process, by identity (path, device, inode, size, mtime, digest): each is read once.
_VERIFIED: set[tuple] = set()


def _hint_for(fmt: str) -> str:
    return {
        "dpd.trajectory": "Delete it and rerun `dpd experts` (finished experts are skipped).",
        "dpd.synthetic": "Rerun `dpd distill` with --resume to rewrite it from the last checkpoint.",
        "dpd.checkpoint": "`dpd distill --resume` moves it aside (*.damaged) and resumes from an older checkpoint.",
    }.get(fmt, "Delete it and recreate it with dpd.")


def _damage_hint(fmt: str) -> str:
    return {
        "dpd.trajectory": "Recreate it: delete it and rerun the `dpd experts` command that wrote it (finished experts are skipped).",
        "dpd.synthetic": "Recreate it: rerun the `dpd distill` command with --resume, which rewrites it from the newest checkpoint.",
        "dpd.checkpoint": "Rerun the `dpd distill` command with --resume: it moves the file aside (*.damaged) and resumes from the previous checkpoint.",
        "dpd.prune_counts": "Recreate it: rerun the `dpd distill` command with --resume, which rewrites it from the newest checkpoint.",
        "dpd.preprocess": "Recreate it: rerun the dpd command that wrote it (`dpd experts`, or `dpd distill --resume` in a run).",
    }.get(fmt, "Recreate it: rerun the dpd command that wrote it.")


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Write ``path`` through a temporary file in the same folder, fsync, rename, fsync the folder.

    A killed process leaves the old file or the new one, never a partial one; the folders' entries
    (including folders created here) are synced, so the rename survives a power cut too.
    """
    path = Path(path)
    try:
        created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise StorageError(_os_message(path, e)) from e
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for folder in [path.parent, *(c.parent for c in created)]:
            fsync_dir(folder)
    except BaseException as e:
        _unlink_quietly(tmp)
        if isinstance(e, OSError):
            raise StorageError(_os_message(path, e)) from e
        raise


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable; a file system that cannot sync folders is skipped."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: this file system does not sync folders (nothing to do)
            raise
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Delete the temporary files (``.NAME.*.tmp``) a killed ``atomic_write`` left in ``folder``; returns them.

    Call it only while holding ``lock_dir`` on the folder (or, with ``names``, a torchrun rank's
    ``lock_shard`` and only that rank's files): another process's temp file is in use.
    """
    patterns = [f".{glob.escape(n)}.*.tmp" for n in names] if names is not None else [".*.tmp"]
    removed = [p for pattern in patterns for p in Path(folder).glob(pattern) if p.is_file()]
    for p in removed:
        _unlink_quietly(p)
    return removed


def _unlink_quietly(p: str | Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(p)


def _os_message(path: Path, e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return f"No space left on the device while writing {path}. Free some space and rerun (add --resume where it applies)."
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Cannot write {path}: {e.strerror}. Choose a writable output folder (--out) or fix its permissions."
    return f"Cannot write {path}: {e.strerror or e}. Check the output folder."


def append_text(path: Path, text: str, sync: bool = False) -> None:
    """Append ``text`` to ``path`` in place (fsynced with ``sync``); if that fails (disk full), cut the file back.

    The bytes go straight to an ``O_APPEND`` descriptor, so a failed write leaves nothing buffered
    that a later flush could add; whatever part of ``text`` reached the file is truncated away and a
    file this call created is removed. Each call's text lands in one piece at the end, whoever else appends.
    """
    path = Path(path)
    data = memoryview(text.encode("utf-8"))
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o666)
            created = True
        except FileExistsError:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            created = False
    except OSError as e:
        raise StorageError(_os_message(path, e)) from e
    start = None  # where this call's bytes begin, once some have been written
    try:
        done = 0
        while done < len(data):
            n = os.write(fd, data[done:])
            if start is None:
                # O_APPEND placed the first bytes at the end as it was then; the offset is now past them.
                start = os.lseek(fd, 0, os.SEEK_CUR) - n
            done += n
        if sync:
            os.fsync(fd)
            if created:
                fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            if start is not None:
                os.ftruncate(fd, start)  # no torn line left behind
            if created and os.fstat(fd).st_size == 0:
                os.unlink(path)
        raise StorageError(_os_message(path, e)) from e
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def _encode_meta(fmt: str, meta: Mapping[str, Any]) -> dict[str, str]:
    out = {"format": fmt, "format_version": str(FORMAT_VERSIONS[fmt]), "dpd_version": __version__}
    for k, v in meta.items():
        if k in _RESERVED:
            raise ValueError(f"metadata key {k!r} is reserved")
        out[k] = json.dumps(v, sort_keys=True, default=str)
    return out


def save_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], fmt: str, meta: Mapping[str, Any] | None = None
) -> None:
    """Save tensors atomically as safetensors, with JSON metadata.

    The header goes first, then each tensor's bytes straight from its memory, so no serialised copy
    of the file is held in memory (a trajectory can be gigabytes). Tensors are laid out by decreasing
    element size, then name, each aligned to its element size, as safetensors' own writer does.
    """
    for k, v in tensors.items():
        if v.layout != torch.strided:
            raise ValueError(f"cannot save {k!r}: {v.layout} tensors are not supported, save a dense tensor")
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # The digest is always this writer's own (metadata copied from a file that was read carries the old one).
    metadata = _encode_meta(fmt, {k: v for k, v in (meta or {}).items() if k != DIGEST_KEY})
    if sys.byteorder != "little":  # safetensors is little-endian; its own writer byte-swaps
        blob = save(clean, metadata=metadata)
        (n,) = struct.unpack("<Q", blob[:8])
        # The data section does not depend on the metadata: hash it, then write the file with its digest.
        digest = hashlib.blake2b(memoryview(blob)[8 + n :], digest_size=_DIGEST_SIZE).hexdigest()
        with atomic_write(Path(path)) as f:
            f.write(save(clean, metadata={**metadata, DIGEST_KEY: json.dumps(digest)}))
        return
    order = sorted(clean, key=lambda k: (-clean[k].element_size(), k))
    views = {name: memoryview(clean[name].reshape(-1).view(torch.uint8).numpy()) for name in order}  # no copy
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    for name in order:  # the data section, in file order, hashed from memory before the header is written
        h.update(views[name])
    metadata[DIGEST_KEY] = json.dumps(h.hexdigest())
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = clean[name]
        if t.dtype not in _DTYPES:
            raise ValueError(f"cannot save {name!r}: safetensors has no dtype for {t.dtype}")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with atomic_write(Path(path)) as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in order:
            data = views[name]
            for i in range(0, len(data), _WRITE_CHUNK):
                f.write(data[i : i + _WRITE_CHUNK])


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensor entries {name: {dtype, shape, data_offsets}}, raw metadata)`` of a safetensors file, checked.

    Raises:
        StorageError: Missing, truncated, foreign or inconsistent file.
    """
    path = Path(path)
    if not path.exists():
        raise StorageError(f"{path} does not exist.")
    if path.is_dir():
        raise StorageError(f"{path} is a folder, not a safetensors file.")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DamagedError(f"{path} is empty or truncated ({size} bytes): not a safetensors file.", "truncated")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or n > size - 8:
                raise DamagedError(
                    f"{path} is not a valid safetensors file (header length {n} does not fit a {size}-byte file); it may be truncated or of another format.",
                    "truncated or not a safetensors file",
                )
            raw = f.read(n)
    except OSError as e:
        raise StorageError(f"Cannot read {path}: {e.strerror or e}.") from e
    try:
        header = json.loads(raw)
    except RecursionError:
        raise DamagedError(
            f"{path} is not a valid safetensors file: its header is nested too deeply.", "bad header"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedError(
            f"{path} is not a valid safetensors file: its header is not JSON ({e}).", "bad header"
        ) from None
    if not isinstance(header, dict):
        raise DamagedError(f"{path} is not a valid safetensors file: its header is not a table.", "bad header")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise DamagedError(f"{path} has malformed metadata (must map text to text).", "bad header")
    end = 0
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
            and {"dtype", "shape"} <= entry.keys()
        ):
            raise DamagedError(f"{path}: tensor entry {name!r} is malformed.", "bad header")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise DamagedError(
            f"{path} is truncated or padded: the header describes {8 + n + end} bytes, the file has {size}. {_hint_for(meta.get('format', ''))}",
            "truncated" if size < 8 + n + end else "padded",
        )
    return header, meta


def read_meta(path: Path, fmt: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensor entries, metadata decoded from JSON)`` of a file of format ``fmt`` (``None``: any), no tensor read."""
    path = Path(path)
    header, raw = read_header(path)
    found = raw.get("format")
    if fmt is not None and found != fmt:
        what = f"a {found!r} file" if found else "not a file written by dpd"
        raise StorageError(f"{path} is {what}; expected a {fmt!r} file. Check the path.")
    if found in FORMAT_VERSIONS:
        version = raw.get("format_version", "")
        if version not in {str(v) for v in READABLE_VERSIONS[found]}:
            raise StorageError(
                f"{path} is {found} format version {version or '?'}, this dpd ({__version__}) reads version "
                f"{' or '.join(map(str, READABLE_VERSIONS[found]))}. Use the dpd version that wrote it, or recreate the file."
            )
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = v if k in _RESERVED else json.loads(v)
        except (json.JSONDecodeError, RecursionError):
            raise DamagedError(
                f"{path}: metadata entry {k!r} is not valid JSON. {_hint_for(found or '')}", "bad header"
            ) from None
    return header, meta


def check_header_tensors(
    path: Path, header: Mapping[str, Any], required: Mapping[str, tuple[torch.dtype, int | None]], hint: str = ""
) -> None:
    """Check the ``required`` tensors' names, dtypes and ranks (``{name: (dtype, ndim or None)}``) from a header."""
    for name, (dtype, ndim) in required.items():
        entry = header.get(name)
        if entry is None:
            raise StorageError(f"{path} lacks the tensor {name!r}.{hint}")
        found = _TYPES.get(entry["dtype"], entry["dtype"])
        if found != dtype or (ndim is not None and len(entry["shape"]) != ndim):
            raise StorageError(
                f"{path}: tensor {name!r} is {found} with shape {tuple(entry['shape'])}; expected {dtype} with {ndim} dimensions."
            )


def load_tensors(
    path: Path, fmt: str | None = None, required: Mapping[str, tuple[torch.dtype, int | None]] | None = None
):
    """``(tensors, metadata)`` of a safetensors file of format ``fmt`` (``None``: any) holding the ``required`` tensors.

    Raises:
        StorageError: Anything wrong with the file, naming the path.
    """
    path = Path(path)
    header, meta = read_meta(path, fmt)
    check_header_tensors(path, header, required or {}, f" {_hint_for(fmt or '')}")
    verify_data(path, meta)
    try:
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DamagedError(f"{path} is corrupted ({e}). {_hint_for(fmt or '')}", "corrupted") from e


def data_digest(path: Path) -> str:
    """BLAKE2b (16 bytes, hex) of the tensor data of a safetensors file: every byte after the header, read in
    chunks of 16 MiB (a file of any size is hashed in constant memory)."""
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as f:
            return _digest_from(f)
    except OSError as e:
        raise StorageError(f"Cannot read {path}: {e.strerror or e}.") from e


def _digest_from(f) -> str:
    """The data digest of the open (unbuffered) safetensors file ``f``."""
    head = f.read(8)
    (n,) = struct.unpack("<Q", head) if len(head) == 8 else (os.fstat(f.fileno()).st_size,)
    f.seek(8 + n)
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    buf = bytearray(_VERIFY_CHUNK)
    view = memoryview(buf)
    while got := f.readinto(buf):
        h.update(view[:got])
    return h.hexdigest()


def verify_data(path: Path, meta: Mapping[str, Any] | None = None) -> bool:
    """Check a file's tensor data against the digest its metadata records (``meta``: its metadata, raw or decoded;
    read from the header if not given). True when it matches, False for a file without one (written before dpd
    recorded checksums: it is read as before, unverified). A file is read once per process: one that was verified
    and has not changed since (same inode, size and modification time) is not read again.

    Raises:
        StorageError: The data does not match (damaged on disk or in transfer), naming the file and what to do.
    """
    path = Path(path)
    if meta is None:
        meta = read_header(path)[1]
    value = meta.get(DIGEST_KEY)
    if value is None:
        return False
    recorded = value.strip('"') if isinstance(value, str) else ""  # raw metadata keeps the JSON quotes
    if not _DIGEST_RE.fullmatch(recorded):
        raise DamagedError(
            f"{path}: the metadata entry {DIGEST_KEY!r} is not a checksum ({str(value)[:80]}). "
            f"{_damage_hint(str(meta.get('format', '')))}",
            "bad checksum entry",
        )
    try:
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, recorded)
            if key in _VERIFIED:
                return True
            found = _digest_from(f)
    except OSError as e:
        raise StorageError(f"Cannot read {path}: {e.strerror or e}.") from e
    if found != recorded:
        raise DamagedError(
            f"{path} is damaged: its tensor data does not match the checksum recorded when it was written "
            f"({DIGEST_KEY} {recorded}, the data now gives {found}); it was damaged on disk or in transfer. "
            f"{_damage_hint(str(meta.get('format', '')))}",
            "checksum mismatch",
        )
    _VERIFIED.add(key)
    return True


class TensorFile:
    """A safetensors file opened for lazy reads (``safe_open`` + ``get_slice``); ``close()`` releases it.

    Opening it verifies the whole tensor data once (``verify_data``, streamed; once per process per file), so the
    rows read later are known good and each read stays as cheap as before.

    Example:
        >>> with TensorFile(path, "dpd.trajectory") as f:
        ...     rows = f.rows("trajectory", [3, 5])   # reads two rows, not the file
    """

    def __init__(self, path: Path, fmt: str | None = None):
        self.path = Path(path)
        self.header, self.meta = read_meta(self.path, fmt)
        self.verified = verify_data(self.path, self.meta)
        try:
            self._handle = safe_open(str(self.path), framework="pt")
        except Exception as e:  # SafetensorError and OS errors
            raise StorageError(f"{self.path} cannot be opened ({e}).") from e

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def rows(self, name: str, indices: list[int]) -> torch.Tensor:
        return self._read(
            lambda h: torch.stack([h.get_slice(name)[i : i + 1][0] for i in indices]), f"rows {indices} of {name!r}"
        )

    def get(self, name: str) -> torch.Tensor:
        return self._read(lambda h: h.get_tensor(name), repr(name))

    def _read(self, read, what: str) -> torch.Tensor:
        if self._handle is None:
            raise ValueError(f"{self.path} was closed")
        try:
            return read(self._handle)
        except Exception as e:  # SafetensorError, and OS errors if the file changed underneath
            raise StorageError(
                f"{self.path}: cannot read {what} ({e}). {_hint_for(self.meta.get('format', ''))}"
            ) from e

    def close(self) -> None:
        """Release the file (its memory map); tensors already read stay valid. Closing twice is fine."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.__exit__(None, None, None)

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: ``flock`` errors that mean the file system does not do locks (NFS without a lock daemon, some
#: parallel and FUSE file systems), as opposed to another process holding the lock.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)
_ADVICE = "Wait for it to finish, or choose another --out."


@contextlib.contextmanager
def lock_dir(
    folder: Path, what: str, name: str = ".lock", advice: str = _ADVICE, shared: bool = False, holder: str = "dpd"
) -> Iterator[None]:
    """Hold an ``flock`` on ``folder/<name>`` (shared or exclusive); a conflicting holder raises ``OutputExistsError``.

    The kernel releases it when the process dies, so a kill leaves no stale lock. A lock belongs to
    one open file description: a second ``lock_dir`` in the same process conflicts with the first.
    ``what`` (``"experts"``) and ``advice`` (its last sentence) word the conflict's message; an exclusive
    holder writes its pid and ``holder`` (what it is, ``"dpd distill"``) into the file for ``lock_holder``.
    """
    folder = Path(folder)
    path = folder / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as e:
        raise StorageError(_os_message(path, e)) from e
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputExistsError(f"Another dpd process is writing {what} in {folder}. {advice}") from None
        except OSError as e:
            if e.errno in _NO_LOCKS:
                raise StorageError(
                    f"Cannot lock {path}: its file system does not support file locks ({e.strerror}; NFS without a lock service and some "
                    "parallel file systems lack them). dpd locks every folder it writes so that two processes never write the same "
                    "files. Use a folder on a local disk: choose it with --out (for dpd evaluate, copy the run there first)."
                ) from None
            raise StorageError(f"Cannot lock {path}: {e.strerror or e}. Check the output folder.") from e
        # Who holds it, for people looking (several shared holders would write over each other); a full
        # disk must not stop the command here, but at its first real write.
        if not shared:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {holder}\n".encode())
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def removed_if_unused(folder: Path, lock: str = ".lock") -> Iterator[None]:
    """Undo the creation of ``folder`` and of the parents made for it when the block wrote nothing but ``lock``
    there: a command refused after locking its output leaves no empty folders behind."""
    made = [p for p in (Path(folder), *Path(folder).parents) if not p.exists()]  # the deepest first
    try:
        yield
    finally:
        for p in made:
            try:
                if {c.name for c in p.iterdir()} - {lock}:
                    break
                (p / lock).unlink(missing_ok=True)
                p.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def lock_shard(folder: Path, what: str, rank: int, world: int, name: str = ".lock", advice: str = _ADVICE):
    """Lock ``folder`` for one process of a torchrun job, or exclusively for a plain process (``world == 1``).

    Rank ``r`` takes ``folder/<name>`` shared, so the job's ranks work side by side while any plain
    process is kept out, and ``folder/<stem>.rank<r>.lock`` exclusively, so a second job's rank ``r``
    is kept out too (``.lock`` gives ``.rank0.lock``, ``.eval.json.lock`` gives ``.eval.json.rank0.lock``).
    """
    if world == 1:
        with lock_dir(folder, what, name, advice):
            yield
        return
    rank_name = f"{name.removesuffix('.lock')}.rank{rank}.lock"
    with lock_dir(folder, what, name, advice, shared=True), lock_dir(folder, what, rank_name, advice):
        yield


def is_locked(folder: Path, name: str = ".lock") -> bool:
    """Whether a process holds ``folder/<name>`` now, exclusively or shared; a missing file or no locks read as not.

    Probed read-only with a non-blocking exclusive ``flock`` that is released at once; nothing is written.
    """
    try:
        fd = os.open(Path(folder) / name, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the descriptor
    except BlockingIOError:
        return True
    except OSError:
        pass
    finally:
        os.close(fd)
    return False


def lock_holder(folder: Path, name: str = ".lock") -> str | None:
    """Who holds ``folder/<name>`` now (``is_locked``): ``"dpd distill (pid 1234)"`` as an exclusive holder recorded
    itself, ``"another dpd process"`` where none did (shared holders record nothing); ``None`` when nobody holds it."""
    if not is_locked(folder, name):
        return None
    try:
        pid, _, holder = (Path(folder) / name).read_text(encoding="utf-8", errors="replace").strip().partition(" ")
        if pid.isdigit() and pid != "0":
            with contextlib.suppress(PermissionError):  # alive, another user's
                os.kill(int(pid), 0)  # a pid recorded by an earlier holder whose process is gone says nothing
            return f"{holder or 'a dpd process'} (pid {pid})"
    except (OSError, ValueError):
        pass
    return "another dpd process"
