"""MTT / FTD / DATM expert buffers, ``replay_buffer_<n>.pt``: found, loaded safely and checked.

MTT's ``buffer.py`` (and FTD's and DATM's copies of it) writes ``torch.save(trajectories, "replay_buffer_<n>.pt")``:
a list of experts, each a list of snapshots (the initialisation, then one per epoch), each the list
``[p.detach().cpu() for p in net.parameters()]`` in ``module.parameters()`` order.

The files are pickles. They are read only with ``torch.load(path, map_location="cpu", weights_only=True)``,
which builds tensors, lists, tuples, dicts and numbers and refuses every other object; anything but nested
lists/tuples of floating-point tensors is then refused here, naming the path and what was found. A refused
file's opcodes are read (``pickletools``, nothing is run) to name the objects it would have created. Nothing
else in dpd reads pickles.
"""

from __future__ import annotations

import hashlib
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch

from dpd_cli.errors import ExpertsError, StorageError
from dpd_cli.text import plural

__all__ = ["PATTERN", "find", "sha256", "load", "check_layout", "flatten"]

#: The file names MTT gives its buffers; a folder given as a source contributes these.
PATTERN = "replay_buffer_*.pt"
_NUMBER = re.compile(r"replay_buffer_(\d+)\.pt$")
#: Modules (and built-ins) whose functions a pickle can call to run commands or code of its own.
_RUNS_CODE = {"os", "posix", "nt", "sys", "subprocess", "runpy", "importlib", "shutil", "socket", "pty", "ctypes"}
_RUNS_CODE_BUILTINS = {"eval", "exec", "compile", "__import__", "getattr", "open", "breakpoint"}
_SAVE_HINT = "A replay buffer must be what MTT's buffer.py saves: a list of experts, each a list of snapshots, each a list of parameter tensors."


def find(sources: list[Path]) -> list[Path]:
    """The buffer files named by ``sources``: files as given, folders as their ``replay_buffer_<n>.pt`` in order of n,
    each file once, where it first appears."""
    if not sources:
        raise StorageError(
            "No replay buffers given. Name the replay_buffer_<n>.pt files, or the folder holding them (MTT writes them "
            "to <buffer_path>/<dataset>[_NO_ZCA]/<model>/)."
        )
    files: list[Path] = []
    for src in map(Path, sources):
        if not str(src).strip():
            raise StorageError("A replay buffer path is empty. Name the replay_buffer_<n>.pt files, or their folder.")
        if src.is_dir():
            found = [p for p in src.glob(PATTERN) if p.is_file() and _NUMBER.search(p.name)]
            if not found:
                raise StorageError(
                    f"{src} holds no replay_buffer_<n>.pt files. Name the buffer files themselves, or the "
                    "folder MTT wrote them to (<buffer_path>/<dataset>[_NO_ZCA]/<model>/)."
                )
            files += sorted(found, key=lambda p: int(_NUMBER.search(p.name).group(1)))
        elif src.is_file():
            files.append(src)
        else:
            raise StorageError(
                f"{src} does not exist. Name the replay_buffer_<n>.pt files, or the folder holding them."
            )
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def sha256(path: Path) -> str:
    """SHA-256 of the file's bytes (hex): identifies a buffer however it is named or wherever it moved."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    except OSError as e:
        raise StorageError(f"Cannot read {path}: {e.strerror or e}.") from e
    return h.hexdigest()


def _globals(path: Path) -> list[str]:
    """The Python objects (``module.name``) the pickle in ``path`` (raw, or a PyTorch zip's ``data.pkl``) refers to,
    read from its opcodes without running any of them; what a damaged pickle holds before the damage."""
    try:
        with zipfile.ZipFile(path) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    except (zipfile.BadZipFile, StopIteration, OSError, KeyError):
        with open(path, "rb") as f:
            data = f.read(64 * 1024 * 1024)
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(".".join(strings[-2:]))
            elif isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
    except Exception:  # damaged or not a pickle: what was read so far
        pass
    return found


def _runs_code(name: str) -> bool:
    module, _, attr = name.partition(".")
    return module in _RUNS_CODE or (module in ("builtins", "__builtin__") and attr in _RUNS_CODE_BUILTINS)


def _load_error(path: Path, e: BaseException) -> StorageError:
    """A one-paragraph reason why ``torch.load(weights_only=True)`` refused ``path``."""
    text = str(e)
    code = [g for g in _globals(path) if _runs_code(g)]
    if code:
        return StorageError(
            f"{path} holds Python objects that would run code when loaded ({', '.join(dict.fromkeys(code))}); refused "
            "— dpd never unpickles."
        )
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return StorageError(
            f"{path} holds pickled Python objects ({m.group(1)}), not only tensors and lists. dpd loads replay buffers "
            "with "
            "torch.load(weights_only=True) and never unpickles other objects (unpickling can run arbitrary code). "
            f"{_SAVE_HINT} Re-save it in that form (plain torch tensors, e.g. torch.from_numpy for NumPy arrays)."
        )
    if path.stat().st_size == 0:
        return StorageError(
            f"{path} is empty (0 bytes): not a replay buffer. Copy it again from where the experts were trained."
        )
    first = " ".join(text.split())
    m = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", first)
    reason = (m.group(1) if m else first or type(e).__name__)[:200]
    return StorageError(
        f"{path} is not a readable PyTorch file ({reason}): it is truncated, corrupted or of another format. Copy it "
        "again from where the experts were trained."
    )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {str(x.dtype).removeprefix('torch.')} tensor of shape {list(x.shape)}"
    if isinstance(x, dict):
        keys = ", ".join(repr(k) for k in list(x)[:4]) + (", ..." if len(x) > 4 else "")
        return f"a dict (keys {keys})" if x else "an empty dict"
    return f"{'an' if type(x).__name__[0] in 'aeiou' else 'a'} {type(x).__name__}"


def load(path: Path) -> list[list[list[torch.Tensor]]]:
    """The experts of one buffer file: ``[expert][snapshot][parameter]`` CPU tensors, checked: a non-empty list
    of experts, each of at least two snapshots, each a non-empty list of floating-point tensors."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the outcome is what matters
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, ... : any way the file can be bad
        raise _load_error(path, e) from None
    if not isinstance(data, (list, tuple)) or not data:
        what = "an empty list" if isinstance(data, (list, tuple)) else _describe(data)
        raise StorageError(f"{path} holds {what} at the top level, expected a list of experts. {_SAVE_HINT}")
    for i, expert in enumerate(data):
        if not isinstance(expert, (list, tuple)) or len(expert) < 2:
            what = f"a list of {len(expert)} snapshot(s)" if isinstance(expert, (list, tuple)) else _describe(expert)
            raise StorageError(
                f"{path}: expert {i} is {what}, expected a list of at least two snapshots (the initialisation and one "
                f"per epoch). {_SAVE_HINT}"
            )
        for e, snapshot in enumerate(expert):
            if not isinstance(snapshot, (list, tuple)) or not snapshot:
                what = "an empty list" if isinstance(snapshot, (list, tuple)) else _describe(snapshot)
                raise StorageError(
                    f"{path}: expert {i}, snapshot {e} is {what}, expected a list of parameter tensors. {_SAVE_HINT}"
                )
            for k, p in enumerate(snapshot):
                if not isinstance(p, torch.Tensor) or not p.is_floating_point() or p.layout != torch.strided:
                    raise StorageError(
                        f"{path}: expert {i}, snapshot {e}, parameter {k} is {_describe(p)}, expected a floating-point "
                        f"tensor. {_SAVE_HINT}"
                    )
    return [list(map(list, expert)) for expert in data]


def check_layout(path: Path, experts: list, layout: list[list], network: str, hint: str) -> int:
    """Check every snapshot of ``load(path)`` against ``layout`` (``FlatModel.layout`` of dpd's ``network``, as
    messages name it); ``hint`` says what to change when they differ. Returns the number of epochs."""
    n_snapshots = len(experts[0])
    for i, expert in enumerate(experts):
        if len(expert) != n_snapshots:
            raise ExpertsError(
                f"{path}: expert {i} has {plural(len(expert), 'snapshot')}, expert 0 has {n_snapshots}; every expert "
                "of "
                "a dpd experts folder has the same number of epochs. Import the buffers of one training setup together."
            )
        for e, snapshot in enumerate(expert):
            for k, ((name, shape), p) in enumerate(zip(layout, snapshot)):
                if list(p.shape) != list(shape):
                    raise ExpertsError(
                        f"{path}: expert {i}, snapshot {e}: parameter {k} has shape {list(p.shape)}, but parameter {k} "
                        "of "
                        f"dpd's {network} ({name}) has shape {list(shape)}. The buffer holds another network; {hint}"
                    )
            if len(snapshot) != len(layout):
                raise ExpertsError(
                    f"{path}: expert {i}, snapshot {e} holds {len(snapshot)} parameter tensors, dpd's {network} has "
                    f"{len(layout)} ({', '.join(n for n, _ in layout)}). The buffer holds another network; {hint}"
                )
    return n_snapshots - 1


def flatten(path: Path, index: int, expert: list[list[torch.Tensor]]) -> torch.Tensor:
    """One expert as a dpd trajectory: ``(snapshots, P)`` float32, row ``e`` = snapshot ``e``'s parameters in order;
    refuses NaN or Inf parameters and identical consecutive snapshots."""
    rows = torch.stack([torch.cat([p.detach().reshape(-1).to(torch.float32) for p in snapshot]) for snapshot in expert])
    bad = (~torch.isfinite(rows)).any(1).nonzero().flatten()
    if len(bad):
        raise StorageError(
            f"{path}: expert {index} holds NaN or Inf parameters from snapshot {int(bad[0])} on (it diverged). "
            "Remove it from the buffer (load the list in Python, delete that expert, save it again) and import again."
        )
    same = (rows[1:] == rows[:-1]).all(1).nonzero().flatten()
    if len(same):
        e = int(same[0])
        raise ExpertsError(
            f"{path}: expert {index}'s snapshots {e} and {e + 1} are identical. MTT's buffer.py trained on a CPU saves "
            "`p.detach().cpu()`, which is the live parameter itself there, so every snapshot is the final network: the "
            "trajectory is lost. Train the buffer on a GPU, or save p.detach().cpu().clone()."
        )
    return rows
