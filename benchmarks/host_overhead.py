#!/usr/bin/env python3
r"""Host time per one-batch training epoch: dpd's ``train_epoch`` against a bare loop, at tiny sizes.

    python benchmarks/host_overhead.py
    python benchmarks/host_overhead.py --reps 9 --epochs 400 --json bench-out/host-overhead.json
    git worktree add /tmp/dpd-old REV && PYTHONPATH=/tmp/dpd-old python benchmarks/host_overhead.py   # an older dpd

Evaluation at small IPC trains one batch per epoch, and on a GPU such a step is bound by the host:
Python, the dispatcher and kernel launches, not the kernels. This script measures that host part on
the CPU by making the kernels nearly free (a ConvNet of width 4 on 2 images of 8 x 8 px, one
thread), so what remains is what dpd's epoch adds per step in Python and extra operations.

dpd's network runs as it does on a GPU: its modules with a CPU-only branch (``norm.AvgPool2`` and
``conv.Conv2d``, which run the student's own pool and convolution on the CPU) take their other
branch (``F.avg_pool2d``; ``nn.Conv2d``'s forward after the same checks). The bare loop trains
PyTorch's own layers (``nn.Conv2d``, ``nn.GroupNorm``, ``nn.AvgPool2d``) with the same optimiser
(SGD, momentum 0.9, weight decay 5e-4, as evaluation), batches and DSA draws. Runs alternate
dpd, bare, dpd, bare ...; reported: the medians in microseconds per epoch, their difference and the
per-run ratios bare / dpd.

This is not a GPU measurement. A GPU pays more host time per operation than the CPU does here (on
the H200 of docs/results.md a bare epoch took 2.75 ms against about 0.95 ms here), so a difference
found here is a lower bound of what a launch-bound GPU pays, and only ``benchmarks/gpu_check.sh``
measures the ratio itself.

The script needs nothing of dpd but ``build_model``, ``train_epoch`` and ``dsa`` (its bare loop is
written here rather than imported from ``speed.py``), so that it runs against older versions too.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import dpd_cli
from dpd_cli.core.augment import dsa
from dpd_cli.core.train import train_epoch
from dpd_cli.models import ModelSpec, build_model


def _copy(new: nn.Module, old: nn.Module) -> nn.Module:
    new.load_state_dict(old.state_dict())
    return new


def pytorch_layers(net: nn.Module) -> nn.Module:
    """``net`` with PyTorch's own convolution, group norm and pool in place of dpd's modules."""
    for name, m in list(net.named_children()):
        if isinstance(m, nn.GroupNorm):
            setattr(net, name, _copy(nn.GroupNorm(m.num_groups, m.num_channels, m.eps), m))
        elif isinstance(m, nn.Conv2d):
            setattr(net, name, _copy(nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding), m))
        elif isinstance(m, nn.AvgPool2d):
            setattr(net, name, nn.AvgPool2d(2, 2))
    return net


def gpu_branch(net: nn.Module) -> nn.Module:
    """``net`` with dpd's CPU-only module branches replaced by the branch they take on a GPU."""
    from dpd_cli.models import norm

    conv = sys.modules.get("dpd_cli.models.conv")
    for name, m in list(net.named_children()):
        if isinstance(m, getattr(norm, "AvgPool2", ())):
            setattr(net, name, nn.AvgPool2d(2, 2))  # AvgPool2.forward on a GPU: F.avg_pool2d
        elif conv is not None and isinstance(m, getattr(conv, "Conv2d", ())):
            check = getattr(type(m), "runs_student_conv", None)
            if check is not None:  # Conv2d.forward still makes its check (a GPU pays for it too), answered "no"
                m.runs_student_conv = lambda t, mod=m, check=check: check(mod, t) and False
            else:  # an older Conv2d with the check inside forward: nn.Conv2d's forward, without the check
                m.forward = lambda t, mod=m: nn.Conv2d.forward(mod, t)
    return net


def cpu_only_functions(out: torch.Tensor) -> set[str]:
    """The nodes behind ``out`` of dpd's Functions that its modules run on the CPU only (conv, pool)."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(f for f, _ in node.next_functions)
    return {type(node).__name__ for node in seen} & {"_Conv2dBackward", "_AvgPool2Backward"}


def bare_epoch(net, opt, x, y, batch, gen, rng):
    """The plainest PyTorch epoch: shuffled index batches, DSA, forward, CE, backward, step."""
    net.train()
    order = torch.randperm(x.shape[0], generator=gen).to(x.device)
    for i in range(0, x.shape[0], batch):
        idx = order[i : i + batch]
        loss = F.cross_entropy(net(dsa(x[idx], rng.getrandbits(63))), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.detach()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=9, help="timed runs per side, interleaved (default 9)")
    p.add_argument("--epochs", type=int, default=400, help="epochs per timed run (default 400)")
    p.add_argument("--warmup", type=int, default=50, help="untimed epochs before each run (default 50)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    spec = ModelSpec("convnet", 3, (8, 8), 10, width=4, depth=3)
    x, y = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    # Evaluation's call (engine.evaluate); a dpd too old for count_correct counts them.
    kw = {"count_correct": False} if "count_correct" in inspect.signature(train_epoch).parameters else {}
    sides = {
        "dpd": (lambda: gpu_branch(build_model(spec)), lambda *a: train_epoch(*a, True, **kw)),
        "bare": (lambda: pytorch_layers(build_model(spec)), bare_epoch),
    }
    left = cpu_only_functions(gpu_branch(build_model(spec))(x))
    if left:  # a CPU-only branch this script does not know would be timed as if it ran on a GPU
        sys.exit(f"dpd's network still runs {sorted(left)} on its GPU branch here: update gpu_branch()")
    us = {k: [] for k in sides}
    for _ in range(args.reps):
        for name, (make, epoch) in sides.items():
            torch.manual_seed(0)
            net = make()
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            gen, rng = torch.Generator().manual_seed(0), random.Random(0)
            for _ in range(args.warmup):
                epoch(net, opt, x, y, 256, gen, rng)
            t0 = time.perf_counter()
            for _ in range(args.epochs):
                epoch(net, opt, x, y, 256, gen, rng)
            us[name].append((time.perf_counter() - t0) / args.epochs * 1e6)
    med = {k: statistics.median(v) for k, v in us.items()}
    out = {
        "dpd_cli": dpd_cli.__file__,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "config": vars(args),
        "us_per_epoch": us,
        "median_us_per_epoch": med,
        "extra_us_per_epoch": med["dpd"] - med["bare"],
        "ratios_bare_over_dpd": [b / d for d, b in zip(us["dpd"], us["bare"])],
    }
    print(f"dpd_cli from {out['dpd_cli']}, torch {torch.__version__}, 1 thread, {args.reps} runs x {args.epochs} epochs each")
    print(f"dpd {med['dpd']:.0f} us/epoch, bare {med['bare']:.0f} us/epoch: dpd adds {out['extra_us_per_epoch']:.0f} us; "
          f"bare / dpd per run {', '.join(f'{r:.3f}' for r in out['ratios_bare_over_dpd'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
