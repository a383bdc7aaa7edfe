"""Data-parallel distillation: two processes (gloo, CPU) give the one-process meta-gradient to 1e-12 in float64."""

from __future__ import annotations

import itertools
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dpd_cli.core import parallel
from dpd_cli.core.matching import StepPlan, meta_gradient
from dpd_cli.core.pruning import PruneConfig, prune_keep_mask
from tests.core.test_matching import Problem

MEMORY = ["full", "low"]
PRUNE = {"mtt": PruneConfig(0.0), "global": PruneConfig(0.1), "layer": PruneConfig(0.2, "layer", "layer-z")}
PLANS = {
    "all": lambda dsa: StepPlan([None] * 3, [11, 12, 13] if dsa else [None] * 3),
    "batch": lambda dsa: StepPlan(
        [torch.tensor([0, 2, 4, 5]), torch.tensor([1, 3, 5, 0]), torch.tensor([5, 4, 3, 2])],
        [21, 22, 23] if dsa else [None] * 3,
    ),
}
CASES = [(*c, False) for c in itertools.product(MEMORY, PRUNE, PLANS, [False, True])]
CASES += [(m, "global", plan, True, True) for m in MEMORY for plan in PLANS]  # soft labels
CASES += [("low-keep2", "global", plan, True, soft) for plan in PLANS for soft in (False, True)]  # kept graphs


def _run_all(n_images: int, group) -> dict:
    """Every case's (loss, dL/dX, dL/dalpha, mask) on this process; the same problem in every process."""
    prob = Problem(n_images=n_images)
    out = {}
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(len(prob.labels), 3, generator=g, dtype=prob.images.dtype)
    for memory, prune, plan_name, dsa, soft in CASES:
        cfg = PRUNE[prune]
        plan = PLANS[plan_name](dsa)
        if n_images == 9 and plan_name == "batch":
            plan = StepPlan(
                [torch.tensor([0, 2, 4, 5, 8]), None, torch.tensor([8, 7, 6])], plan.seeds
            )  # 5 and 3 rows: uneven
        mask = None if cfg.ratio <= 0 else (lambda e, t, s, cfg=cfg: prune_keep_mask(e, t, s, cfg, prob.sizes))
        res = meta_gradient(
            prob.fm,
            prob.images,
            prob.labels,
            prob.lr,
            prob.start,
            prob.target,
            plan,
            memory[:3],
            loss_mask=mask,
            batch_grad=None if group is None else parallel.ShardedGradient(group),
            label_logits=logits if soft else None,
            keep_graphs=2 if memory == "low-keep2" else 0,
        )
        out[(memory, prune, plan_name, dsa, soft)] = (
            res.loss,
            res.grad_images,
            res.grad_lr,
            res.keep,
            res.grad_labels if soft else torch.zeros(()),
        )
    return out


def _worker(rank: int, world: int, port: int, n_images: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    group = parallel.start(torch.device("cpu"), timeout_s=60)
    try:
        out = _run_all(n_images, group)
        if rank == 0:
            torch.save({str(k): v for k, v in out.items()}, result_path)
        group.barrier()
    finally:
        parallel.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


@pytest.mark.parametrize("n_images", [6, 9], ids=["even", "uneven"])
def test_two_processes_give_the_one_process_meta_gradient(tmp_path, n_images):
    path = str(tmp_path / "two.pt")
    mp.start_processes(_worker, args=(2, _free_port(), n_images, path), nprocs=2, start_method="spawn")
    two = torch.load(path, weights_only=True)
    one = _run_all(n_images, None)
    for key, (loss, gx, ga, keep, gy) in one.items():
        l2, gx2, ga2, keep2, gy2 = two[str(key)]
        assert _rel(l2, loss) <= 1e-12, key
        assert _rel(gx2, gx) <= 1e-12, key
        assert _rel(ga2, ga) <= 1e-12, key
        assert _rel(gy2, gy) <= 1e-12, key
        assert (keep is None and keep2 is None) or torch.equal(keep, keep2), key


def test_rows_split_evenly():
    from dpd_cli.core.parallel import Group

    for n in (1, 2, 7, 9, 100):
        for world in (1, 2, 3, 4):
            parts = [Group(r, world, 1.0).rows(n) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [hi - lo for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1
