#!/usr/bin/env python3
r"""Seconds per distillation iteration, dpd vs the reference MTT loop, interleaved in ONE process.

    python benchmarks/distill_ab.py                                  # ConvNet-128, IPC 10, N 20, DSA on, rho 0
    python benchmarks/distill_ab.py --warmup 3 --iters 5 --json bench-out/distill-ab.json
    python benchmarks/distill_ab.py --device cuda --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
        --steps 30 --iters 10 --json bench-out/distill-ab-gpu.json   # the GPU check's comparison

``speed.py``'s distill section runs each configuration in its own process, one after the other,
which also gives each its peak memory; on a shared machine the load can change between them.
Here every mode runs in the same process, round by round (the order rotates each round), so a
change in load hits all modes alike. Modes:

* ``full`` / ``low``: ``matching.meta_gradient`` with ``memory=full|low`` plus the SGD updates of
  ``engine.distill.run`` (as ``speed.py``'s distill worker);
* ``lowK`` (``low8``, ``low20``, ...): ``low`` keeping the last K steps' graphs from its forward
  sweep (dpd's ``--keep-graphs K``);
* ``full_det`` / ``low_det``: ``full`` / ``low`` with cuDNN's deterministic algorithms (dpd's
  ``--deterministic``), switched on for their calls only;
* ``full_aten``: ``full`` with ATen's own kernels where ``dpd_cli.models.norm`` has CPU-only ones
  (``avg_pool2d`` and ``avg_pool2d_backward`` for the pool, a batched matmul for the norm's dots:
  what dpd runs on a GPU), switched for its calls only -- what those CPU kernels buy;
* ``ref``: the reference MTT iteration (``mtt_reference.py``: ReparamModule-style student,
  ``nn.Conv2d``, ``nn.GroupNorm``, ``nn.AvgPool2d``);
* ``sweep``: low memory's forward sweep alone (its N plain gradient passes and parameter updates,
  no loss, no backward sweep): ``low`` minus ``sweep`` is low memory's backward sweep, which does
  full memory's work step by step;
* ``full_gn`` (with ``--with-group-norm``): ``full`` with the student of ``op_count.py``'s
  ``group_norm_student`` (``F.group_norm``, ``F.relu``, ``F.avg_pool2d``) -- what dpd ran before
  ``dpd_cli.models.norm``;
* ``full_graph`` / ``low_graph`` / ``lowK_graph`` (CUDA only): ``full`` / ``low`` / ``lowK`` through ``engine.graphs`` (dpd's
  ``--cuda-graphs``), captured during the first warm-up round. A captured graph keeps its memory, so
  every mode's peak measured after them includes what the graphs hold.

On the CPU, ``--host-memory`` sets dpd's allocator switch for the whole process, so for every mode.

Every mode uses the same DSA seeds in round i and the same start/target parameters; rho = 0
everywhere (the reference has no pruning). Reported per mode: median, min and max seconds of the
timed rounds, CPU seconds (process time; well below threads x wall time means the threads waited
for cores), and the medians of the per-round ratios. On a GPU the device is synchronised around
every timed call and each mode's peak is ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``; on the CPU one process cannot separate the modes' peaks, so only the
process's peak RSS is reported (``speed.py`` runs each mode in its own process for that). The
environment (threads, TF32 and cuDNN flags, versions) is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from dpd_cli.core import matching
from dpd_cli.core.graphs import GraphedMetaGradient
from dpd_cli.models import FlatModel, build_model
from dpd_cli.config.settings import DistillSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mtt_reference import MTTReference  # noqa: E402
from op_count import group_norm_student  # noqa: E402
from speed import _plan, class_balanced, environment, load_data, make_spec, setup_runtime, sync  # noqa: E402


def setup(args):
    dev = setup_runtime(args.device, args.threads, False, args.host_memory)
    ds, pre = load_data(args.dataset, args.data_dir)
    spec = make_spec(ds, args.width)
    idx = class_balanced(ds.train_labels, ds.n_classes, args.ipc, seed=0)
    images = pre.apply(ds.train_images[idx]).to(dev)
    labels = ds.train_labels[idx].to(dev)
    torch.manual_seed(0)
    start = FlatModel(build_model(spec)).flatten()
    target = start + 0.01 * torch.randn_like(start)
    return spec, images, labels, start.to(dev), target.to(dev)


def flags() -> dict:
    """The switches that change kernels or threads, as they were during the run."""
    return {
        "torch_threads": torch.get_num_threads(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def make_runners(args, spec, images, labels, start, target) -> dict:
    s = DistillSettings()
    n = len(labels)
    batch_syn = min(args.batch_syn or n, n)
    dev = images.device

    def plan(it):
        return _plan(random.Random(it), n, batch_syn, args.steps, not args.no_dsa, dev)

    def dpd_runner(memory: str, before: bool = False, graphed: bool = False, keep: int = 0):
        fm = FlatModel(build_model(spec).to(dev))
        if before:  # the student as it was before dpd_cli.models.norm
            fm.module.forward_flat = group_norm_student(fm.module)
        x = images.clone()
        lr = torch.tensor(s.lr_teacher, device=dev)
        mom_x, mom_lr = torch.zeros_like(x), torch.zeros_like(lr)
        runner = None
        if graphed:  # engine.distill's CUDA-graph path (captured in the first call, a warm-up round)
            runner = GraphedMetaGradient(fm, x, labels, lr, memory, args.steps, batch_syn if batch_syn < n else None,
                                         not args.no_dsa, lambda ratio: None, keep_graphs=keep)

        def run(it):
            if runner is not None:
                res, note = runner(start, target, plan(it), 0.0)
                if note:  # the runner goes on eagerly; the report says so
                    print(f"{memory}_graph: {note} Its times below are eager ones.", file=sys.stderr, flush=True)
            else:
                res = matching.meta_gradient(fm, x, labels, lr, start.clone(), target.clone(), plan(it), memory,
                                             keep_graphs=keep)  # rho 0
            with torch.no_grad():  # engine.distill.run's updates
                mom_x.mul_(0.5).add_(res.grad_images)
                x.sub_(s.lr_img * mom_x)
                mom_lr.mul_(0.5).add_(res.grad_lr)
                lr.sub_(s.lr_lr * mom_lr)
            return float(res.loss)

        run.graphed = runner
        return run

    def sweep_runner():  # matching._meta_low's forward sweep with no graphs kept, nothing after it
        fm = FlatModel(build_model(spec).to(dev))
        lr = torch.tensor(s.lr_teacher, device=dev)

        def run(it):
            theta = start.clone()
            with torch.enable_grad():
                for idx, seed, mix in plan(it).steps():
                    th = theta.detach().requires_grad_(True)
                    g = matching._inner_grad(fm, th, images, labels, idx, seed, create_graph=False, mix=mix)
                    with torch.no_grad():
                        theta = theta - lr * g
            return float(theta.sum())
        return run

    ref = MTTReference(spec, images.clone(), labels, s.lr_teacher, s.lr_img, s.lr_lr, batch_syn)
    start_buf, target_buf = MTTReference.buffer_entry(start, spec), MTTReference.buffer_entry(target, spec)
    runners = {
        "full": dpd_runner("full"),
        "low": dpd_runner("low"),
        "ref": lambda it: float(ref.iteration(start_buf, target_buf, plan(it).seeds)),
    }
    if args.with_group_norm:
        runners["full_gn"] = dpd_runner("full", before=True)
    if "graph" in args.modes:
        if dev.type != "cuda":
            sys.exit("full_graph / low_graph need --device cuda")
        runners["full_graph"] = dpd_runner("full", graphed=True)
        runners["low_graph"] = dpd_runner("low", graphed=True)
    for k in args.modes.split(","):
        m = re.fullmatch(r"low(\d+)(_graph)?", k)  # lowK / lowK_graph: low memory keeping the last K steps' graphs
        if k in ("full_det", "low_det"):  # with cuDNN's deterministic algorithms (--deterministic)
            runners[k] = deterministic(dpd_runner(k[:-4]))
        elif k == "sweep":
            runners[k] = sweep_runner()
        elif k == "full_aten":
            runners[k] = aten_kernels(dpd_runner("full"))
        elif m:
            if m[2] and dev.type != "cuda":
                sys.exit(f"{k} needs --device cuda")
            runners[k] = dpd_runner("low", graphed=bool(m[2]), keep=int(m[1]))
    return {k: runners[k] for k in args.modes.split(",") + (["full_gn"] if args.with_group_norm else [])}


def deterministic(run):
    """``run`` with ``torch.backends.cudnn.deterministic`` on (dpd's ``--deterministic``), the flags
    restored after each call so that the other modes, interleaved with it, keep the defaults."""
    def wrapped(it):
        saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            return run(it)
        finally:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    return wrapped


def aten_kernels(run):
    """``run`` with ``dpd_cli.models.norm``'s CPU-only pool and dot kernels replaced by ATen's (the
    ones it runs on a GPU), restored after each call so that the other modes keep dpd's."""
    import torch.nn.functional as F

    from dpd_cli.models import norm

    def pool_backward(dy, x):
        return torch.ops.aten.avg_pool2d_backward(dy, x, [2, 2], [2, 2], [0, 0], False, True, None)

    def dot(u, v):
        n, c, m = u.shape
        return torch.bmm(u.reshape(n * c, 1, m), v.reshape(n * c, m, 1)).view(n, c, 1)

    swap = {"_pool": lambda x: F.avg_pool2d(x, 2, 2), "_pool_backward": pool_backward, "_dot": dot}

    def wrapped(it):
        saved = {k: getattr(norm, k) for k in swap}
        for k, f in swap.items():
            setattr(norm, k, f)
        try:
            return run(it)
        finally:
            for k, f in saved.items():
                setattr(norm, k, f)
    return wrapped


def _stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist-mini")
    p.add_argument("--data-dir", default=None, help="dataset folder (imagefolder: the folder with train/ and test/)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="N, student steps per iteration (default 20)")
    p.add_argument("--batch-syn", type=int, default=100)
    p.add_argument("--no-dsa", action="store_true")
    p.add_argument("--modes", default="full,low,ref", help="full, low, ref, lowK (low keeping the last K steps' graphs, "
                   "--keep-graphs K), full_det, low_det (--deterministic), full_aten (ATen's pool and dot kernels), "
                   "sweep (low's forward sweep alone); "
                   "on CUDA also full_graph, low_graph, lowK_graph (--cuda-graphs)")
    p.add_argument("--with-group-norm", action="store_true", help="also time full with F.group_norm (dpd before the fused norm)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds (default 3)")
    p.add_argument("--iters", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--host-memory", choices=["reuse", "system"], default="reuse",
                   help="CPU allocator as dpd's --host-memory (default reuse, dpd's default); one process, so every mode shares it")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    args.cudnn_benchmark = False  # dpd never sets it (environment() records it)
    load_start = os.getloadavg()
    setup_args = setup(args)
    dev = setup_args[1].device
    runners = make_runners(args, *setup_args)
    names = list(runners)
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    losses = {k: [] for k in names}
    peak = {k: 0 for k in names}
    loads = []
    for r in range(args.warmup + args.iters):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            sync(dev)
            c0, t0 = time.process_time(), time.perf_counter()
            losses[k].append(runners[k](r))  # float(loss) syncs too; the explicit sync keeps that out of doubt
            sync(dev)
            t, c = time.perf_counter() - t0, time.process_time() - c0
            if dev.type == "cuda":
                peak[k] = max(peak[k], torch.cuda.max_memory_allocated(dev))
            if r >= args.warmup:
                wall[k].append(t)
                cpu[k].append(c)
        loads.append(os.getloadavg()[0])
        done = ", ".join(f"{k} {wall[k][-1]:.2f} s" for k in names) if r >= args.warmup else "warm-up"
        print(f"round {r}: {done}  load {loads[-1]:.2f}", file=sys.stderr, flush=True)

    def paired(a, b):  # median over rounds of a_i / b_i
        return statistics.median(x / y for x, y in zip(wall[a], wall[b]))

    out = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "environment": environment(args, dev),
        "flags": flags(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peak_bytes": peak if dev.type == "cuda" else None,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loadavg_start": load_start,
        "loadavg_per_round": loads,
        "seconds": wall,
        "cpu_seconds": cpu,
        "stats": {k: _stats(v) for k, v in wall.items()},
        "cpu_stats": {k: _stats(v) for k, v in cpu.items()},
        "losses": losses,
    }
    ratios = {}
    if "ref" in wall and "full" in wall:
        ratios["ref_over_full"] = paired("ref", "full")
    if "low" in wall and "full" in wall:
        ratios["low_over_full"] = paired("low", "full")
    if "ref" in wall and "low" in wall:
        ratios["ref_over_low"] = paired("ref", "low")
    if "full_gn" in wall:
        ratios["full_gn_over_full"] = paired("full_gn", "full")
        if "ref" in wall:
            ratios["ref_over_full_gn"] = paired("ref", "full_gn")
    for m in ("full", "low"):
        if f"{m}_graph" in wall:
            ratios[f"{m}_over_{m}_graph"] = paired(m, f"{m}_graph")  # what the graph saves
            if "ref" in wall:
                ratios[f"ref_over_{m}_graph"] = paired("ref", f"{m}_graph")
    if "low_graph" in wall and "full_graph" in wall:
        ratios["low_graph_over_full_graph"] = paired("low_graph", "full_graph")
    for k in wall:  # lowK against full, eager with eager and graphs with graphs
        m = re.fullmatch(r"low\d+(_graph)?", k)
        base = "full_graph" if m and m[1] else "full"
        if m and base in wall:
            ratios[f"{k}_over_{base}"] = paired(k, base)
    if "sweep" in wall and "full" in wall:
        ratios["sweep_over_full"] = paired("sweep", "full")  # low memory's extra work, as a share of full's
        if "low" in wall:
            ratios["low_minus_sweep_over_full"] = statistics.median(
                (a - b) / c for a, b, c in zip(wall["low"], wall["sweep"], wall["full"]))  # its backward sweep
    if "full_aten" in wall and "full" in wall:
        ratios["full_aten_over_full"] = paired("full_aten", "full")  # what the CPU pool and dot kernels save
    for m in ("full", "low"):
        if f"{m}_det" in wall and m in wall:
            ratios[f"{m}_det_over_{m}"] = paired(f"{m}_det", m)  # what --deterministic costs
    out["paired_ratios_median"] = ratios
    # Each graph's check before use: how far its first replay was from the eager result (and eager from itself).
    out["graphs"] = {k: {"kept": fn.graphed.enabled, "checks": {str(r): c for r, c in fn.graphed.checks.items()}}
                     for k, fn in runners.items() if getattr(fn, "graphed", None) is not None}

    c = args
    where = out["environment"].get("gpu") or out["environment"].get("cpu") or str(dev)
    print(f"ConvNet-{c.width}, {c.dataset}, IPC {c.ipc}, N {c.steps}, batch_syn {c.batch_syn}, rho 0, DSA {'off' if c.no_dsa else 'on'}, "
          f"{dev} ({where}), {out['threads']} threads, {c.warmup} warm-up + {c.iters} timed rounds, interleaved; torch {torch.__version__}")
    print("flags: " + ", ".join(f"{k} {v}" for k, v in out["flags"].items()))
    print(f"load average (1 min) at start {load_start[0]:.2f}, per round {', '.join(f'{v:.2f}' for v in loads)}")
    gib = 2 ** 30
    print("| mode | s/it median | min | max | CPU s/it median | peak GiB |")
    print("|---|---|---|---|---|---|")
    for k in names:
        st, cs = out["stats"][k], out["cpu_stats"][k]
        pk = f"{peak[k] / gib:.2f}" if dev.type == "cuda" else "–"
        print(f"| {k} | {st['median']:.3f} | {st['min']:.3f} | {st['max']:.3f} | {cs['median']:.3f} | {pk} |")
    if dev.type != "cuda":
        print(f"process peak RSS (all modes together): {out['process_peak_rss_bytes'] / gib:.2f} GiB")
    print("paired ratios (median over rounds): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    for k, g in out["graphs"].items():
        for c in g["checks"].values():
            spread = c["eager_spread"]
            print(f"{k}: graph {'kept' if g['kept'] else 'turned off (times are eager)'}; first replay vs eager: "
                  + ", ".join(f"{q} {v:.1e}" for q, v in c["replay"].items())
                  + ("" if spread is None else "; eager vs eager: " + ", ".join(f"{q} {v:.1e}" for q, v in spread.items())))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
