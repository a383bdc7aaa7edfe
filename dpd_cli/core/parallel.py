"""One job over several processes under ``torchrun``: the process group, a rank's rows, the collectives.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and the rendezvous address; ``start`` creates the process
group at the start of a command (gloo, or NCCL when every rank has a GPU of its own) with an
explicit timeout, so a rank whose partner failed or was stopped gives up after ``timeout_s`` with a
message instead of hanging; ``stop`` destroys it. Under plain ``python`` there is no group and
every function here is a no-op on one process.

Distillation splits every student step's mini-batch into contiguous rows, one share per rank (the
first ``n % W`` ranks take one row more); ``docs/algorithm.md`` ("Data parallel") gives the maths.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dpd_cli.core.augment import dsa
from dpd_cli.errors import UserError

__all__ = ["Group", "ParallelError", "ShardedGradient", "start", "stop", "held", "alone", "world_from_env"]


class ParallelError(UserError):
    """Another rank failed, stopped or did not answer in time."""


def world_from_env() -> tuple[int, int]:
    """``(rank, world size)`` from torchrun's environment; ``(0, 1)`` under plain python."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


#: How long ``Group.gather_objects`` waits: ranks may finish their shares of a job hours apart.
PATIENT_TIMEOUT_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Group:
    """This process's place in the job: its rank among ``world`` processes.

    Collectives time out after ``timeout_s``, except ``gather_objects``, which collects results at the
    end of a job and waits for the slowest rank (a rank that fails still ends the job at once: its
    connections close, and torchrun stops the other ranks).
    """

    rank: int
    world: int
    timeout_s: float
    patient: object = None  # the process group gather_objects uses

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and shows progress."""
        return self.rank == 0

    def rows(self, n: int) -> tuple[int, int]:
        """``[lo, hi)``: this rank's contiguous share of ``n`` rows (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # gloo/NCCL timeouts and closed connections (DistBackendError is a RuntimeError)
            raise ParallelError(
                f"Rank {self.rank} of {self.world}: {what} failed ({str(e).splitlines()[0][:200]}). Another rank has "
                f"stopped, failed or did not answer within {self.timeout_s:g} s (--dist-timeout); its own output says why. "
                "Fix that and rerun the same command (with --resume for distill)."
            ) from e

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (no autograd)."""
        self._call("summing a tensor over the ranks", dist.all_reduce, t)
        return t

    def any(self, flag: bool, device) -> bool:
        """True on every rank if ``flag`` is true on any (a stop request seen by one rank stops all)."""
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        return bool(self.sum_(t).item() > 0)

    def barrier(self) -> None:
        self._call("waiting for the other ranks", dist.barrier)

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj``, in rank order (pickled through the process group: trusted, our own processes)."""
        out: list = [None] * self.world
        self._call("gathering results from the ranks", dist.all_gather_object, out, obj, group=self.patient)
        return out


class _SumOverRanks(torch.autograd.Function):
    """y = sum over the ranks of x. Every rank's loss depends on y, so dL/dx is the sum over the ranks of dL/dy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return group.sum_(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.group.sum_(grad.clone()), None


class ShardedGradient:
    """``matching.BatchGradient`` over the ranks: each rank takes its rows of the mini-batch b.

    A rank computes grad of (its rows' summed CE) / |b|, its share; the sum over the ranks is the
    whole gradient, which every rank returns (differentiably when the graph is kept: the backward of
    that sum adds up the incoming gradients of all ranks, so a rank's gradients with respect to the
    images, alpha or theta are W times its share). ``reduce`` turns such a per-rank result into the
    whole: the sum over the ranks, divided by W.
    """

    def __init__(self, group: Group):
        self.group = group

    def __call__(self, fm, theta, images, labels, idx, seed, mix, create_graph: bool) -> torch.Tensor:
        if mix is not None:
            raise ValueError("mixed DSA (the CUDA-graph path) is not used under data parallel")
        x = images if idx is None else images[idx]
        y = labels if idx is None else labels[idx]
        n = len(y)
        lo, hi = self.group.rows(n)
        x, y = x[lo:hi], y[lo:hi]
        if seed is not None:
            x = dsa(x, seed, part=(lo, n))  # the whole batch's draws, this rank's rows
        ce = F.cross_entropy(fm(theta, x), y, reduction="sum") / n
        (g,) = torch.autograd.grad(ce, theta, create_graph=create_graph)
        return _SumOverRanks.apply(g, self.group) if create_graph else self.group.sum_(g)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.group.sum_(t.clone()).div_(self.group.world)


def start(device: torch.device, timeout_s: float, required: bool = True) -> Group | None:
    """Join torchrun's process group (``None`` under plain python).

    Args:
        required: Without torchrun's rendezvous (``MASTER_ADDR``), as when a batch scheduler's job array
            sets ``RANK`` and ``WORLD_SIZE`` itself, return ``None`` if ``False`` (ranks that need not talk
            to each other), else refuse.

    Raises:
        ParallelError: The rendezvous failed or timed out, or is missing where it is required.
    """
    rank, world = world_from_env()
    if world == 1:
        return None
    if "MASTER_ADDR" not in os.environ:
        if not required:
            return None
        raise ParallelError(
            f"WORLD_SIZE is {world} but there is no rendezvous address (MASTER_ADDR): the ranks of this command must "
            "talk to each other. Start it with torchrun (torchrun --nproc-per-node N -m dpd_cli -- COMMAND ...), or "
            "unset RANK and WORLD_SIZE to run one process."
        )

    join = functools.partial(Group(rank, world, timeout_s)._call, "joining the other ranks")
    if not dist.is_initialized():
        gpus = torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nccl = device.type == "cuda" and dist.is_nccl_available() and gpus
        join(dist.init_process_group, "nccl" if nccl else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    # Every rank creates the patient group now, together (new_group is itself collective).
    patient = join(dist.new_group, backend="gloo", timeout=datetime.timedelta(seconds=PATIENT_TIMEOUT_S))
    return Group(rank, world, timeout_s, patient)


_held = False  # inside held(): the commands run in it leave the group in place


def stop() -> None:
    """Leave the process group, if one was joined (and is not ``held`` by a job of several commands)."""
    if not _held and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def held(device: torch.device, timeout_s: float):
    """The process group for a job of several commands (``dpd study``), kept while they start and stop;
    yields its ``Group`` (``None`` under plain python)."""
    global _held
    group = start(device, timeout_s)
    _held = group is not None
    try:
        yield group
    finally:
        _held = False
        stop()


@contextlib.contextmanager
def alone():
    """Run a command as one process under torchrun: ``RANK`` and ``WORLD_SIZE`` are hidden meanwhile
    (``LOCAL_RANK`` stays: the rank keeps its GPU)."""
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
