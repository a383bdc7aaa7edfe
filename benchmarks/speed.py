#!/usr/bin/env python3
r"""Speed of dpd: expert and evaluation training, distillation against the reference MTT loop, data parallel.

Sections (``--only``, default ``experts,distill,eval``): ``experts`` / ``eval`` (dpd's ``train_epoch``
against a bare PyTorch loop, interleaved), ``distill`` (s/it and peak memory, each mode in a fresh
process), ``ab`` (every mode interleaved in one process, rho 0, paired per-round ratios), ``dp``
(``DistillRecipe`` on ``--experts``, alone or under torchrun), ``batched`` (``--concurrent`` K experts and
evaluation networks as one ``Stack`` against one at a time, paired; K distillations as one ``BatchRecipe``
against one run, on ``--experts`` or, without, a tiny experts folder of its own, at the first ``--ipc`` and
``--steps``). Modes (``--modes``): ``full``, ``low``,
``lowK`` (``--keep-graphs K``), ``ref`` (``mtt_reference.py``); in ``ab`` also ``sweep``, ``full_det`` /
``low_det`` and on CUDA ``full_graph`` / ``low_graph`` / ``lowK_graph``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dpd_cli import __version__
from dpd_cli.artifacts.experts import ExpertSet
from dpd_cli.config.settings import DistillSettings, EvalSettings, ExpertSettings, resolve
from dpd_cli.core import matching
from dpd_cli.core.augment import dsa
from dpd_cli.core.graphs import GraphedMetaGradient
from dpd_cli.core.pruning import PruneConfig, Pruner
from dpd_cli.core.train import Stack, sgd, train_epoch
from dpd_cli.data import load_dataset
from dpd_cli.models import FlatModel, ModelSpec, build_model, default_depth
from dpd_cli.recipes import experts as experts_recipe
from dpd_cli.recipes.batch import BatchRecipe
from dpd_cli.recipes.distill import DistillRecipe
from dpd_cli.recipes.distill_inputs import draw_plan
from dpd_cli.recipes.evaluate import random_subset
from dpd_cli.recipes.runtime import build_preprocess, set_host_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mtt_reference import MTTReference, buffer_entry, mtt_network  # noqa: E402

GIB = 2**30
SECTIONS = ("experts", "distill", "eval", "ab", "dp", "batched")
MODE_RE = re.compile(r"(full|low|ref|sweep|full_det|low_det|low\d+)(_graph)?")
PROTOCOL_EPOCHS = 1000  # one MTT-protocol evaluation network
SMOKE = {
    "width": 8,
    "expert_images": 256,
    "expert_reps": 1,
    "eval_ipc": 1,
    "eval_epochs": 2,
    "eval_reps": 1,
    "ipc": "1",
    "steps": "2",
    "iters": 1,
    "warmup": 1,
    "threads": 1,
    "modes": "full,low1,ref,sweep",
    "only": "experts,distill,eval,ab,batched",
    "concurrent": 2,
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def setup(device: str, threads: int, host_memory: str, cudnn_benchmark: bool = False) -> torch.device:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA GPU is available to torch.")
        torch.backends.cudnn.benchmark = cudnn_benchmark
    set_host_memory(host_memory, dev)
    return dev


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev, fn) -> float:
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else {}


def environment(args, dev) -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = re.search(r"model name\s*:\s*(.*)", info)
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dpd": __version__,
        "git": git or None,
        "cpu": cpu[1] if cpu else platform.processor(),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "device": str(dev),
        "cores": len(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "host_memory": args.host_memory,
        "loadavg_start": os.getloadavg()[0],
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def load_data(dataset: str, data_dir: str | None, width: int):
    ds = load_dataset(dataset, Path(data_dir) if data_dir else None)
    c, h, w = ds.image_shape
    return (
        ds,
        build_preprocess(ds, zca=False),
        ModelSpec("convnet", c, (h, w), ds.n_classes, width, default_depth((h, w))),
    )


# ----------------------------------------------------------------------------- experts and eval: dpd against a bare loop


def bare_epoch(net, opt, x, y, batch, gen, rng) -> None:
    """The plainest PyTorch epoch: shuffled index batches, DSA, forward, CE, backward, step."""
    net.train()
    order = torch.randperm(x.shape[0], generator=gen).to(x.device)
    for i in range(0, x.shape[0], batch):
        idx = order[i : i + batch]
        loss = F.cross_entropy(net(dsa(x[idx], rng.getrandbits(63))), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def against_bare(args, dev, section: str) -> dict:
    """dpd's ``train_epoch`` against ``bare_epoch``, fresh networks from the same seed, interleaved repetitions."""
    ds, pre, spec = load_data(args.dataset, args.data_dir, args.width)
    if section == "experts":
        s, lr, reps, epochs = ExpertSettings(), ExpertSettings().lr, args.expert_reps, 1
        n = min(args.expert_images or len(ds.train_labels), len(ds.train_labels))
        idx = torch.randperm(len(ds.train_labels), generator=torch.Generator().manual_seed(0))[:n]
    else:
        s, lr, reps, epochs = EvalSettings(), 0.01, args.eval_reps, args.eval_epochs
        idx = random_subset(ds.train_labels, ds.n_classes, args.eval_ipc, 0)
    x, y = pre.apply(ds.train_images[idx]).to(dev), ds.train_labels[idx].to(dev)

    def run(side: str, r: int, n_epochs: int) -> None:
        torch.manual_seed(1000 + r)
        net = (build_model(spec) if side == "dpd" else mtt_network(spec)).to(dev)
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, epochs // 2)], gamma=0.1)
        gen, rng = torch.Generator().manual_seed(r), random.Random(r)
        for _ in range(n_epochs):
            if side == "dpd":
                train_epoch(net, opt, x, y, s.batch, gen, rng, True, count_correct=section == "experts")
            else:
                bare_epoch(net, opt, x, y, s.batch, gen, rng)
            if section == "eval":
                sched.step()

    for side in ("dpd", "bare"):  # untimed warm-up: allocator, kernels, thread pool
        run(side, -1, 1)
    secs = {"dpd": [], "bare": []}
    for r in range(reps):
        for side in secs:
            secs[side].append(timed(dev, lambda: run(side, r, epochs)))
    unit = len(y) if section == "experts" else epochs  # images/s or epochs/s
    rate = {k: [unit / t for t in v] for k, v in secs.items()}
    med = {k: statistics.median(v) for k, v in rate.items()}
    out = {"images": len(y), "width": spec.width, "batch": s.batch, "lr": lr, "momentum": s.momentum}
    out |= {"weight_decay": s.weight_decay, "reps": reps, "epochs_per_rep": epochs, "seconds": secs, "rate": rate}
    out |= {"median": med, "unit": "images/s" if section == "experts" else "epochs/s"}
    out["dpd_over_bare"] = med["dpd"] / med["bare"]
    if section == "eval":
        out["mtt_protocol_minutes_per_network"] = PROTOCOL_EPOCHS / med["dpd"] / 60
    log(f"[{section}] dpd {med['dpd']:.2f} {out['unit']}, bare {med['bare']:.2f}, ratio {out['dpd_over_bare']:.3f}")
    return out


# ----------------------------------------------------------------------------- batched: K networks at once against one at a time


def bench_batched(args, dev) -> dict:
    """``--concurrent K`` networks as one ``Stack`` against K one at a time: experts (1 epoch) and evaluation networks."""
    ds, pre, spec = load_data(args.dataset, args.data_dir, args.width)
    k, n, out = args.concurrent, min(args.expert_images or len(ds.train_labels), len(ds.train_labels)), {}
    subsets = {"experts": torch.randperm(len(ds.train_labels), generator=torch.Generator().manual_seed(0))[:n]}
    subsets["eval"] = random_subset(ds.train_labels, ds.n_classes, args.eval_ipc, 0)
    for sec, s, epochs, reps in (
        ("experts", ExpertSettings(), 1, args.expert_reps),
        ("eval", EvalSettings(), args.eval_epochs, args.eval_reps),
    ):
        x, y = pre.apply(ds.train_images[subsets[sec]]).to(dev), ds.train_labels[subsets[sec]].to(dev)

        def run(m: int) -> None:  # k networks, m at a time
            nets = [build_model(spec).to(dev) for _ in range(k)]
            for group in [nets[i : i + m] for i in range(0, k, m)]:
                net, gens = group[0] if m == 1 else Stack(group), [torch.Generator().manual_seed(i) for i in range(m)]
                opt, rngs = sgd(net, [0.01] * m, s.momentum, s.weight_decay), [random.Random(i) for i in range(m)]
                xs, ys, gen, rng = (x, y, gens[0], rngs[0]) if m == 1 else ([x] * m, [y] * m, gens, rngs)
                for _ in range(epochs):
                    train_epoch(net, opt, xs, ys, s.batch, gen, rng, True, count_correct=sec == "experts")

        secs, peak = {1: [], k: []}, {1: 0, k: 0}
        for r in range(reps + 1):  # the first round warms up, untimed
            for m in secs:
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                t = timed(dev, lambda: run(m))
                peak[m] = max(peak[m], torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0)
                secs[m] += [t] if r else []
        unit = (k * len(y), "images/s") if sec == "experts" else (k, f"networks/s ({epochs} epochs each)")
        rate = {m: statistics.median(unit[0] / t for t in v) for m, v in secs.items()}
        paired = statistics.median(a / b for a, b in zip(secs[1], secs[k]))
        out[sec] = {"k": k, "images": len(y), "unit": unit[1], "seconds": secs, "rate": rate, "peak_bytes": peak}
        out[sec] |= {"speedup_paired_median": paired, "width": spec.width, "batch": s.batch}
        log(f"[batched {sec}] 1 at a time {rate[1]:.2f}, {k} at once {rate[k]:.2f} {unit[1]}, paired ×{paired:.2f}")
    out["distill"] = bench_batched_distill(args, dev)
    return out


def bench_batched_distill(args, dev) -> dict:
    """K distillations as one ``BatchRecipe`` against one ``DistillRecipe`` as a user runs it (on a GPU with CUDA
    graphs, the batch eagerly), interleaved: aggregate iterations/s, and peak memory allocated (CUDA)."""
    k, tmp = args.concurrent, Path(tempfile.mkdtemp(prefix="dpd-speed-batched-"))
    experts = args.experts
    if experts is None:  # --smoke: a tiny experts folder of its own
        experts = str(tmp / "experts")
        flags = {"num": 1, "epochs": 2, "width": args.width, "train_per_class": 20, "threads": args.threads}
        experts_recipe.run(
            resolve("experts", {**flags, "dataset": args.dataset, "out": experts, "device": args.device})
        )
    flags = {"experts": experts, "ipc": args.ipcs[0], "syn_steps": args.step_list[0], "batch_syn": args.batch_syn}
    flags |= {"prune_ratio": args.prune_ratio, "device": args.device, "threads": args.threads, "lr_img": 1.0}
    flags |= {"iterations": 10**6, "checkpoint_every": 10**6, "log_every": 10**6, "max_start_epoch": 1, "force": True}
    runs = [resolve("distill", {**flags, "expert_epochs": 1, "seed": i, "out": str(tmp / f"run{i}")}) for i in range(k)]
    one_s = resolve("distill", {**flags, "expert_epochs": 1, "seed": 0, "out": str(tmp / "one")})
    secs, peak = {1: [], k: []}, {1: 0, k: 0}
    with DistillRecipe(one_s) as one, BatchRecipe(runs, None, DistillRecipe) as many:
        for r in range(args.warmup + args.iters):  # the warm-up rounds untimed (CUDA graphs are captured there)
            for m, step in ((1, one.step), (k, many.step)):
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                t = timed(dev, step)
                peak[m] = max(peak[m], torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0)
                secs[m] += [t] if r >= args.warmup else []
        images, width = len(one.state.images), one.spec.width
    rate = {m: statistics.median(m / t for t in v) for m, v in secs.items()}
    paired = statistics.median(k * a / b for a, b in zip(secs[1], secs[k]))
    log(f"[batched distill] 1 run {rate[1]:.2f}, {k} as one batch {rate[k]:.2f} iterations/s, paired ×{paired:.2f}")
    return {
        "k": k,
        "what": "runs",
        "images": images,
        "steps": args.step_list[0],
        "unit": f"iterations/s over all runs (N {args.step_list[0]}, rho {args.prune_ratio:g})",
        "seconds": secs,
        "rate": rate,
        "peak_bytes": peak,
        "speedup_paired_median": paired,
        "width": width,
        "batch": args.batch_syn or "all",
    }


# ----------------------------------------------------------------------------- one distillation iteration per mode


def make_runners(cfg: dict, modes: list[str], dev) -> tuple[dict, dict]:
    """``mode -> run(it) -> loss`` on one shared problem (images, start and target parameters, per-iteration draws)."""
    ds, pre, spec = load_data(cfg["dataset"], cfg["data_dir"], cfg["width"])
    s = DistillSettings()
    if cfg.get("experts"):  # expert 0's epochs 0 and M, read per iteration as the real loop does
        ex = ExpertSet(Path(cfg["experts"]))
        spec, pre, epochs = ex.spec, ex.preprocess, min(s.expert_epochs, ex.epochs)

        def rows():
            return tuple(t.to(dev) for t in ex.pair(0, 0, epochs))
    else:
        torch.manual_seed(0)
        start0 = FlatModel(build_model(spec)).flatten()
        pair = (start0.to(dev), (start0 + 0.01 * torch.randn_like(start0)).to(dev))

        def rows():
            return pair

    idx = random_subset(ds.train_labels, ds.n_classes, cfg["ipc"], 0)
    images0, labels = pre.apply(ds.train_images[idx]).to(dev), ds.train_labels[idx].to(dev)
    n, n_steps, ratio = len(labels), cfg["steps"], cfg["prune_ratio"]
    batch = min(cfg["batch_syn"] or n, n)

    plan_settings = s.model_copy(update={"batch_syn": batch, "syn_steps": n_steps, "dsa": True})

    def plan(it):
        return draw_plan(random.Random(it), n, plan_settings, dev)

    def dpd(memory: str, keep: int = 0, graphed: bool = False, det: bool = False):
        fm = FlatModel(build_model(spec).to(dev))
        sizes = [layer.numel for layer in fm.layers]
        x, lr = images0.clone(), torch.tensor(s.lr_teacher, device=dev)
        mom_x, mom_lr = torch.zeros_like(x), torch.zeros_like(lr)
        pruner = Pruner(PruneConfig(ratio), sizes)
        counts = torch.zeros(fm.n_params, dtype=torch.int32, device=dev)
        problem = (fm, x, labels, lr)
        graph = None
        if graphed:
            batches = batch if batch < n else None
            graph = GraphedMetaGradient(*problem, memory, n_steps, batches, True, pruner.loss_mask, keep_graphs=keep)

        def run(it):
            start, target = rows()
            saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
            if det:  # for this mode's calls only; the modes interleaved with it keep the defaults
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            try:
                if graph is not None:
                    res, note = graph(start, target, plan(it), ratio)
                    if note:
                        log(f"{memory} graph: {note} (its times are eager ones)")
                else:
                    unroll = (start.clone(), target.clone(), plan(it), memory)
                    res = matching.meta_gradient(*problem, *unroll, loss_mask=pruner.loss_mask(ratio), keep_graphs=keep)
            finally:
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
            with torch.no_grad():  # engine.distill.run's updates
                mom_x.mul_(0.5).add_(res.grad_images)
                x.sub_(s.lr_img * mom_x)
                mom_lr.mul_(0.5).add_(res.grad_lr)
                lr.sub_(s.lr_lr * mom_lr)
                if res.keep is not None:
                    counts.add_((~res.keep).to(torch.int32))
            return res.loss

        run.graph = graph
        return run

    def sweep():  # low memory's forward sweep: N plain gradient passes and parameter updates, nothing after them
        fm = FlatModel(build_model(spec).to(dev))
        lr = torch.tensor(s.lr_teacher, device=dev)

        def run(it):
            theta = rows()[0]
            for b, seed, _ in plan(it).steps():
                th = theta.detach().requires_grad_(True)
                xb, yb = (images0, labels) if b is None else (images0[b], labels[b])
                xb = xb if seed is None else dsa(xb, seed)
                (g,) = torch.autograd.grad(F.cross_entropy(fm(th, xb), yb), th)
                theta = theta - lr * g
            return theta.sum()

        return run

    def ref():
        r = MTTReference(spec, images0.clone(), labels, s.lr_teacher, s.lr_img, s.lr_lr, batch)

        def run(it):
            start, target = rows()
            return r.iteration(buffer_entry(start, spec), buffer_entry(target, spec), plan(it).seeds)

        return run

    out = {}
    for mode in modes:
        m = MODE_RE.fullmatch(mode)
        base, graphed = m[1], bool(m[2])
        if graphed and dev.type != "cuda":
            sys.exit(f"{mode} needs --device cuda")
        if base == "ref":
            out[mode] = ref()
        elif base == "sweep":
            out[mode] = sweep()
        else:
            memory = "full" if base.startswith("full") else "low"
            keep = int(base[3:]) if base[3:].isdigit() else 0
            out[mode] = dpd(memory, keep, graphed, base.endswith("_det"))
    info = {"n_images": n, "batch_syn": batch, "n_params": sum(p.numel() for p in build_model(spec).parameters())}
    info |= {"width": spec.width, "depth": spec.depth, "image_shape": list(images0.shape[1:])}
    info["source"] = cfg.get("experts") or "random: PyTorch init, target = start + 0.01 N(0,1)"
    return out, info


# ----------------------------------------------------------------------------- distill: each configuration in its own process


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(cfg: dict) -> dict:
    dev = setup(cfg["device"], cfg["threads"], cfg["host_memory"], cfg["cudnn_benchmark"])
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.5)  # the same imports in every mode
    runners, info = make_runners(
        {**cfg, "prune_ratio": 0.0 if cfg["mode"] == "ref" else cfg["prune_ratio"]}, [cfg["mode"]], dev
    )
    run = runners[cfg["mode"]]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    losses = [float(run(0))]  # warm-up, untimed (its peak counts: the same work)
    times = [timed(dev, lambda: losses.append(float(run(it)))) for it in range(1, cfg["iters"] + 1)]
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else rss()
    out = {**info, "seconds": times, "s_per_it": statistics.median(times), "peak_bytes": peak, "losses": losses}
    return {**out, "finite": all(map(math.isfinite, losses))}


def run_worker(args, job: dict) -> dict:
    try:
        cmd = [sys.executable, __file__, "--worker", json.dumps(job)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.worker_timeout:.0f} s"}
    if p.returncode:
        return {"error": f"exit {p.returncode}: " + " | ".join(p.stderr.strip().splitlines()[-3:])[-400:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_distill(args, cfg: dict, modes: list[str]) -> dict:
    done = []
    for ipc in args.ipcs:
        for n in args.step_list:
            for mode in modes:
                r = run_worker(args, {**cfg, "mode": mode, "ipc": ipc, "steps": n, "iters": args.iters})
                r.update(mode=mode, ipc=ipc, steps=n)
                result = f"{r['s_per_it']:.3f} s/it, peak {r['peak_bytes'] / GIB:.2f} GiB" if "error" not in r else ""
                log(f"[distill] IPC {ipc} N {n} {mode}: {result or 'FAILED ' + r['error']}")
                done.append(r)
    return {"configs": done, "iters": args.iters, "prune_ratio": args.prune_ratio}


# ----------------------------------------------------------------------------- ab: interleaved in one process


def bench_ab(args, dev, cfg: dict) -> list[dict]:
    blocks = []
    for ipc in args.ipcs:
        for n in args.step_list:
            runners, info = make_runners({**cfg, "ipc": ipc, "steps": n, "prune_ratio": 0.0}, args.mode_list, dev)
            names = list(runners)
            wall, peak = {k: [] for k in names}, dict.fromkeys(names, 0)
            for r in range(args.warmup + args.iters):
                for k in names[r % len(names) :] + names[: r % len(names)]:
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    t = timed(dev, lambda: float(runners[k](r)))
                    if dev.type == "cuda":
                        peak[k] = max(peak[k], torch.cuda.max_memory_allocated(dev))
                    if r >= args.warmup:
                        wall[k].append(t)
                log(
                    f"[ab] IPC {ipc} N {n} round {r}: "
                    + (", ".join(f"{k} {wall[k][-1]:.2f} s" for k in names) if r >= args.warmup else "warm-up")
                    + f", load {os.getloadavg()[0]:.2f}"
                )

            def paired(a, b):
                return statistics.median(x / y for x, y in zip(wall[a], wall[b]))

            ratios = {}
            for k in names:  # each mode against full (graphs against full_graph), and the reference against each
                base = "full_graph" if k.endswith("_graph") and "full_graph" in wall else "full"
                if k != base and base in wall and k != "ref":
                    ratios[f"{k}/{base}"] = paired(k, base)
                if k != "ref" and "ref" in wall:
                    ratios[f"ref/{k}"] = paired("ref", k)
            if {"low", "sweep", "full"} <= set(wall):  # low memory's backward sweep over full
                ratios["(low-sweep)/full"] = statistics.median(
                    (a - b) / c for a, b, c in zip(wall["low"], wall["sweep"], wall["full"])
                )
            graphs = {
                k: {"kept": f.graph.enabled, "checks": {str(q): c for q, c in f.graph.checks.items()}}
                for k, f in runners.items()
                if getattr(f, "graph", None) is not None
            }
            block = {"ipc": ipc, "steps": n, **info, "seconds": wall, "stats": {k: stats(v) for k, v in wall.items()}}
            block |= {"peak_bytes": peak if dev.type == "cuda" else None, "process_peak_rss_bytes": rss()}
            blocks.append({**block, "paired_ratios_median": ratios, "graphs": graphs})
    return blocks


# ----------------------------------------------------------------------------- dp: DistillRecipe, one process or under torchrun


def bench_dp(args, experts: str) -> dict | None:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = {}
    for memory in [m for m in args.mode_list if m in ("full", "low")] or ["full"]:
        flags = {"experts": experts, "ipc": args.ipcs[0], "syn_steps": args.step_list[0], "batch_syn": args.batch_syn}
        flags |= {"memory": memory, "prune_ratio": 0.0, "device": args.device, "threads": args.threads, "lr_lr": 0.0}
        flags |= {"iterations": args.warmup + args.iters + 1, "max_start_epoch": 1, "expert_epochs": 1, "lr_img": 1.0}
        out_dir = Path(tempfile.gettempdir()) / f"dpd-speed-dp-w{world}-{memory}"
        s = resolve("distill", {**flags, "out": str(out_dir), "force": True, "log_every": 1000})
        with DistillRecipe(s) as recipe:
            dev = recipe.device
            for _ in range(args.warmup):
                recipe.step()
            sync(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            times = [timed(dev, recipe.step) for _ in range(args.iters)]
            mine = {
                "rank": rank,
                "seconds": times,
                "median_s": statistics.median(times),
                "threads": torch.get_num_threads(),
                "peak_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else rss(),
            }
            ranks = recipe.group.gather_objects(mine) if recipe.group is not None else [mine]
        out[memory] = {"world": world, "ranks": ranks, "median_s": max(r["median_s"] for r in ranks)}
    return out if rank == 0 else None


# ----------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [
        f"## dpd speed — {env['gpu'] or env['cpu']} ({env['device']}, torch {env['torch']}, {env['threads']} threads)",
        "",
    ]
    if env["device"] == "cpu" and env["loadavg_start"] > 0.5:
        lines += [
            f"**warning:** load average {env['loadavg_start']:.1f} at the start: other processes used the CPU; timings are not clean.",
            "",
        ]
    for sec in ("experts", "eval"):
        if sec in res:
            e = res[sec]
            lines += [
                f"### {sec}: {e['unit']}, ConvNet-{e['width']}, {e['images']} images, batch {e['batch']}, DSA on, "
                f"{e['reps']} interleaved reps of {e['epochs_per_rep']} epoch(s)",
                "",
                "| trainer | median | runs | dpd / bare |",
                "|---|---|---|---|",
            ]
            for k, name in (("dpd", "dpd `train_epoch`"), ("bare", "bare PyTorch loop")):
                lines.append(
                    f"| {name} | {e['median'][k]:.2f} | {', '.join(f'{v:.2f}' for v in e['rate'][k])} | "
                    + (f"{e['dpd_over_bare']:.3f} |" if k == "dpd" else " |")
                )
            if sec == "eval":
                lines.append(
                    f"\nOne MTT-protocol network ({PROTOCOL_EPOCHS} epochs) ≈ {e['mtt_protocol_minutes_per_network']:.1f} min here."
                )
            lines.append("")
    if "distill" in res:
        d = res["distill"]
        kind = "max_memory_allocated" if env["device"].startswith("cuda") else "process peak RSS"
        lines += [
            f"### distill: s/it and {kind}, prune ratio {d['prune_ratio']} (ref: 0), median of {d['iters']} after 1 warm-up, "
            "fresh process each",
            "",
            "| IPC | N | mode | s/it | peak GiB | time / full | memory / full |",
            "|---|---|---|---|---|---|---|",
        ]
        full = {(r["ipc"], r["steps"]): r for r in d["configs"] if r["mode"] == "full" and "s_per_it" in r}
        for r in d["configs"]:
            f = full.get((r["ipc"], r["steps"]))
            if "s_per_it" in r:
                rel = f"{r['s_per_it'] / f['s_per_it']:.3f} | {r['peak_bytes'] / f['peak_bytes']:.3f}" if f else "– | –"
                lines.append(
                    f"| {r['ipc']} | {r['steps']} | {r['mode']} | {r['s_per_it']:.3f} | {r['peak_bytes'] / GIB:.2f} | {rel} |"
                )
            else:
                lines.append(f"| {r['ipc']} | {r['steps']} | {r['mode']} | {r['error']} | – | – | – |")
        lows = [r for r in d["configs"] if r["mode"] == "low" and "peak_bytes" in r]
        for ipc in sorted({r["ipc"] for r in lows}):
            runs = sorted((r for r in lows if r["ipc"] == ipc), key=lambda r: r["steps"])
            a, b = runs[0], runs[-1]
            if b["steps"] > a["steps"]:
                lines.append(
                    f"\nlow-memory peak, IPC {ipc}, N {a['steps']} → {b['steps']}: {100 * (b['peak_bytes'] / a['peak_bytes'] - 1):+.1f}%"
                )
        lines.append("")
    for b in res.get("ab", []):
        lines += [
            f"### ab: ConvNet-{b['width']}, IPC {b['ipc']}, N {b['steps']}, batch_syn {b['batch_syn']}, rho 0, interleaved, "
            f"{res['args']['warmup']} warm-up + {res['args']['iters']} timed rounds",
            "",
            "| mode | s/it median | min | max | peak GiB |",
            "|---|---|---|---|---|",
        ]
        for k, st in b["stats"].items():
            pk = f"{b['peak_bytes'][k] / GIB:.2f}" if b["peak_bytes"] else "–"
            lines.append(f"| {k} | {st['median']:.3f} | {st['min']:.3f} | {st['max']:.3f} | {pk} |")
        lines.append(
            "\npaired ratios (median over rounds): "
            + ", ".join(f"{k} {v:.3f}" for k, v in b["paired_ratios_median"].items())
        )
        for k, g in b["graphs"].items():
            lines.append(
                f"{k}: graph {'kept' if g['kept'] else 'turned off (eager times)'}; checks " + json.dumps(g["checks"])
            )
        lines.append("")
    for sec, b in (res.get("batched") or {}).items():
        peak = {m: f"{v / GIB:.2f}" if v else "–" for m, v in b["peak_bytes"].items()}
        lines += [
            f"### batched {sec}: ConvNet-{b['width']}, {b['images']} images, batch {b['batch']}, DSA on; {b['unit']}",
            "",
            f"| {b.get('what', 'networks')} at once | rate | peak GiB allocated (CUDA) |",
            "|---|---|---|",
            *(f"| {m} | {r:.2f} | {peak[m]} |" for m, r in b["rate"].items()),
            f"\n{b['k']} at once vs one at a time: ×{b['speedup_paired_median']:.2f} (median of paired rounds)\n",
        ]
    for memory, d in (res.get("dp") or {}).items():
        lines.append(
            f"### dp ({memory}): {d['world']} process(es), "
            + ", ".join(
                f"rank {r['rank']} {r['median_s']:.3f} s/it peak {r['peak_bytes'] / GIB:.2f} GiB" for r in d["ranks"]
            )
        )
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true", help="every section at toy size, 1 thread")
    p.add_argument("--only", default="experts,distill,eval", help=f"sections: {','.join(SECTIONS)}")
    p.add_argument("--out", help="JSON file (Markdown next to it, .md)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    p.add_argument("--host-memory", choices=["reuse", "system"], default="reuse", help="for every side")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark on")
    p.add_argument("--dataset", default="fashion-mnist-mini")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--expert-images", type=int, default=None, help="experts: images per epoch (default all)")
    p.add_argument("--expert-reps", type=int, default=3)
    p.add_argument("--eval-ipc", type=int, default=10)
    p.add_argument("--eval-epochs", type=int, default=20)
    p.add_argument("--eval-reps", type=int, default=5)
    p.add_argument("--concurrent", type=int, default=8, help="batched: networks trained (runs distilled) at once")
    p.add_argument("--ipc", default="10", help="comma-separated (distill, ab; dp takes the first)")
    p.add_argument("--steps", default="10,20,40,80", help="comma-separated N (distill, ab; dp takes the first)")
    p.add_argument("--modes", default="full,low,ref", help="see above (default full,low,ref)")
    p.add_argument("--iters", type=int, default=2, help="timed iterations (distill), rounds (ab), iterations (dp)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds (ab) or iterations (dp)")
    p.add_argument("--batch-syn", type=int, default=None, help="images per student step (default, or 0: all)")
    p.add_argument("--prune-ratio", type=float, default=DistillSettings().prune_ratio, help="distill's rho")
    p.add_argument("--experts", help="experts folder: expert 0's epochs, not random parameters (dp needs one)")
    p.add_argument("--worker-timeout", type=float, default=3600)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        for k, v in SMOKE.items():
            if getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
    a.threads = a.threads or len(os.sched_getaffinity(0))
    a.ipcs, a.step_list = [int(v) for v in a.ipc.split(",")], [int(v) for v in a.steps.split(",")]
    a.mode_list, a.sections = a.modes.split(","), a.only.split(",")
    bad = [m for m in a.mode_list if not MODE_RE.fullmatch(m)] + [s for s in a.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown mode(s) or section(s): {bad}")
    return a


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    dev = setup(args.device, args.threads, args.host_memory, args.cudnn_benchmark)
    res = {"environment": environment(args, dev), "args": {k: v for k, v in vars(args).items() if k != "worker"}}
    keys = ("threads", "host_memory", "cudnn_benchmark", "dataset", "data_dir", "width", "experts", "batch_syn")
    cfg = {"device": str(dev), "prune_ratio": args.prune_ratio, **{k: getattr(args, k) for k in keys}}
    for sec in ("experts", "eval"):
        if sec in args.sections:
            res[sec] = against_bare(args, dev, sec)
    if "distill" in args.sections:  # --smoke: its first two modes (a process each)
        res["distill"] = bench_distill(args, cfg, args.mode_list[:2] if args.smoke else args.mode_list)
    if "ab" in args.sections:
        res["ab"] = bench_ab(args, dev, cfg)
    if "batched" in args.sections:
        res["batched"] = bench_batched(args, dev)
    if "dp" in args.sections:
        if args.experts is None:
            sys.exit("--only dp needs --experts")
        res["dp"] = bench_dp(args, args.experts)
        if res["dp"] is None:  # not rank 0
            return 0
    text = markdown(res)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
        Path(args.out).with_suffix(".md").write_text(text + "\n")
    failed = [r for r in res.get("distill", {}).get("configs", []) if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
