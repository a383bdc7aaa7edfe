"""Small pieces every engine entry point uses: devices, threads, seeds, data on device."""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path

import torch

from dpd_cli.config.settings import MPS_REFUSED
from dpd_cli.data import Dataset, Preprocess, fit_zca
from dpd_cli.errors import DataError, DeviceError
from dpd_cli.models import ModelSpec, default_depth
from dpd_cli.text import plural

__all__ = [
    "dataset_key",
    "resolve_device",
    "set_threads",
    "set_host_memory",
    "prepare_runtime",
    "derive_seed",
    "build_preprocess",
    "model_spec",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a user error.

    Raises:
        DeviceError: No such GPU, ``mps`` (see ``dpd_cli.config.settings.MPS_REFUSED``) or an unknown name.
    """
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")  # never MPS: see MPS_REFUSED
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            built = "built with CUDA " + torch.version.cuda if torch.version.cuda else "built without CUDA"
            raise DeviceError(
                f"--device {name} was asked for, but no CUDA GPU is available (torch {torch.__version__}, {built}). Use --device cpu or --device auto."
            )
        dev = torch.device(name)
        if dev.index is None and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per local rank
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {name}: this machine has {plural(torch.cuda.device_count(), 'GPU')}, numbered from 0."
            )
        return dev
    if name == "mps":
        raise DeviceError(f"--device {MPS_REFUSED}")
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"--device {name}: unknown device; use auto, cpu, cuda or cuda:N.")


def set_threads(threads: int | None) -> int:
    """Use one intra-op thread per available core unless told otherwise (oversubscription is slow).

    Under torchrun the cores are split between the local ranks.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = threads or max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(n)
    return n


# glibc's mallopt parameters (malloc.h) and the largest value its ``int`` argument takes.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_INT_MAX = 2**31 - 1
_host_memory_applied: str | None = None


def set_host_memory(mode: str, device: torch.device) -> str | None:
    """Keep freed CPU tensor memory in the process for reuse (``mode="reuse"``, on the CPU only).

    glibc's malloc serves every allocation above a threshold (at most 32 MB, the size of one
    100-image ConvNet-128 activation at 28x28) with a fresh ``mmap`` and returns it with ``munmap``
    when it is freed, so the kernel faults in and zeroes the pages again on the next use: millions
    of page faults per distillation iteration, a third of its time on two cores (docs/results.md,
    "Speed and memory on CPU"). ``reuse`` raises the mmap threshold to 1 GiB and stops the heap from
    being trimmed, so freed blocks are reused; the process's peak RSS grows somewhat (fragmentation).
    Process-wide and applied once; a no-op off glibc (macOS, musl), on a GPU run and with
    ``mode="system"``.

    Returns:
        What was applied (``"reuse"``), or ``None`` when nothing changed.
    """
    global _host_memory_applied
    if mode != "reuse" or device.type != "cpu" or _host_memory_applied:
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # Some glibc versions refuse a threshold above 32 MB; then no allocation is mmapped at all.
    if not mallopt(_M_MMAP_THRESHOLD, 1 << 30):
        mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, _INT_MAX)
    _host_memory_applied = mode
    return mode


def prepare_runtime(threads: int | None, device: str, deterministic: bool = False) -> torch.device:
    """What every recipe does first: torch's threads, the device, and cuDNN's choice of algorithms
    (``--deterministic``: the deterministic ones, no autotuning). The CPU allocator (``set_host_memory``)
    is process-wide: the command line sets it before a recipe runs."""
    set_threads(threads)
    dev = resolve_device(device)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.backends.cudnn.benchmark = False
    return dev


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed derived from ``seed`` and any keys, stable across runs and platforms."""
    h = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def build_preprocess(ds: Dataset, zca: bool) -> Preprocess:
    """The training-space transform of ``ds`` as MTT builds it (see ``dpd_cli.data.preprocess``).

    With ZCA, no mean/std normalisation: the whitening is fitted on the raw [0, 1] pixels of
    the training images (MTT loads them with ``ToTensor()`` only when ``--zca`` is on).
    """
    if not zca:
        return Preprocess(torch.tensor(ds.mean), torch.tensor(ds.std))
    c = ds.image_shape[0]
    pre = Preprocess(torch.zeros(c), torch.ones(c))  # identity normalisation: x = pixels / 255
    pre.zca_mean, pre.zca_matrix, pre.zca_inverse = fit_zca(pre.normalize(ds.train_images))
    return pre


def model_spec(settings, ds: Dataset, name: str | None = None) -> ModelSpec:
    c, h, w = ds.image_shape
    depth = settings.depth or default_depth((h, w))
    spec = ModelSpec(
        name or settings.model, c, (h, w), ds.n_classes, settings.width, depth, settings.norm, settings.pool
    )
    if spec.name == "convnet":
        side = min(h, w) + (4 if (c == 1 and (h, w) == (28, 28)) else 0)
        if side >> depth < 1:
            raise DataError(
                f"--depth {depth} is too deep for {h}x{w} images: use at most {max(1, side.bit_length() - 1)}."
            )
    return spec


def dataset_key(settings) -> str:
    """The dataset's name for folders and compatibility checks; image folders are told apart by their folder name."""
    if settings.dataset == "imagefolder":
        return f"imagefolder-{Path(settings.data_dir).resolve().name}"
    return settings.dataset
