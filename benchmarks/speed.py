#!/usr/bin/env python3
r"""Speed benchmarks for dpd: expert training, distillation (full vs low memory vs reference MTT), evaluation.

    python benchmarks/speed.py --smoke                          # every section at toy size (< 1 min)
    python benchmarks/speed.py --out bench-out/speed-cpu.json   # the real CPU measurement
    python benchmarks/speed.py --only distill --device cuda --dataset imagefolder --data-dir /tmp/cifar10-jpeg \
        --ipc 10,50 --steps 30 --out bench-out/speed-gpu.json

Sections (``--only experts,distill,eval``):

experts  images/s of ``dpd_cli.core.train.train_epoch`` with the expert settings' SGD (defaults
         of ``ExpertSettings``: lr 0.01, no momentum, no weight decay, batch 256, DSA on) against a
         bare PyTorch loop written here, same network (PyTorch's own ``nn.Conv2d``, ``nn.GroupNorm`` and ``nn.AvgPool2d``: ``plain_layers``), batches and DSA; repetitions interleaved
         A B A B ..., medians and their ratio.
distill  seconds per iteration and peak memory of ``matching.meta_gradient`` + the SGD updates of
         ``engine.distill.run``, ``full`` vs ``low`` memory (``lowK``: low keeping the last K steps'
         graphs, ``--keep-graphs K``), and the reference MTT inner loop
         (``benchmarks/mtt_reference.py``), each configuration in a fresh subprocess. Peak memory is
         ``ru_maxrss`` of that subprocess on CPU (the whole process: Python, torch, data) and
         ``torch.cuda.max_memory_allocated`` on CUDA. A configuration whose estimated peak exceeds
         ``--mem-limit-gb`` is reported as skipped instead of run.
eval     epochs/s of the evaluation training (``train_epoch`` with the ``EvalSettings`` defaults:
         SGD momentum 0.9, weight decay 5e-4, batch 256, DSA, step schedule) on IPC x classes
         real images, against a bare loop; interleaved, medians, ratio.

Ratios are always measured in the same run. Threads are set explicitly with
``torch.set_num_threads`` (``--threads``, default: the cores this process may use) in this
process and in every worker, and reported.
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
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dpd_cli.core.augment import dsa
from dpd_cli.data import load_dataset
from dpd_cli.recipes import distill as distill_engine
from dpd_cli.recipes.distill_inputs import draw_plan
from dpd_cli.core import matching, pruning
from dpd_cli.recipes.runtime import build_preprocess, set_host_memory
from dpd_cli.core.train import train_epoch
from dpd_cli.models import FlatModel, ModelSpec, build_model, default_depth
from dpd_cli.config.settings import DistillSettings, EvalSettings, ExpertSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mtt_reference import MTTReference, check_against_dpd, plain_layers  # noqa: E402

GIB = 1024**3
SECTIONS = ("experts", "distill", "eval")
MODES = ("full", "low", "ref")

# Toy sizes for --smoke: every code path, seconds of compute.
SMOKE = {
    "width": 16,
    "expert_images": 512,
    "expert_reps": 2,
    "eval_ipc": 2,
    "eval_epochs": 3,
    "eval_reps": 2,
    "ipc": "2",
    "steps": "2,4",
    "iters": 1,
    "worker_timeout": 300,
    "threads": 1,  # a validation run on a possibly busy machine: 2 OpenMP threads on shared cores crawl
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- setup


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def setup_runtime(device: str, threads: int, cudnn_benchmark: bool, host_memory: str = "reuse") -> torch.device:
    """Threads, device and host allocator as ``dpd`` sets them (``host_memory``: dpd's ``--host-memory``)."""
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


def timed(dev: torch.device, fn) -> float:
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


def load_data(dataset: str, data_dir: str | None):
    ds = load_dataset(dataset, Path(data_dir) if data_dir else None)
    return ds, build_preprocess(ds, zca=False)


def make_spec(ds, width: int) -> ModelSpec:
    c, h, w = ds.image_shape
    return ModelSpec("convnet", c, (h, w), ds.n_classes, width, default_depth((h, w)))


def class_balanced(labels: torch.Tensor, n_classes: int, per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` images of each class, class-major (as dpd's synthetic sets)."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(n_classes):
        idx = torch.nonzero(labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks)


def environment(args, dev: torch.device) -> dict:
    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cores_available": default_threads(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(dev),
        "cudnn_benchmark": bool(args.cudnn_benchmark) if dev.type == "cuda" else None,
        "host_memory": args.host_memory if dev.type == "cpu" else None,
        "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["cuda"] = torch.version.cuda
    try:
        import dpd_cli

        env["dpd"] = dpd_cli.__version__
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except Exception:  # noqa: BLE001 - informational only
        pass
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- experts


def bare_epoch(net, opt, x, y, batch, gen, rng, augment: bool) -> torch.Tensor:
    """The plainest PyTorch epoch: shuffled index batches, (DSA), forward, CE, backward, step."""
    net.train()
    order = torch.randperm(x.shape[0], generator=gen).to(x.device)
    for i in range(0, x.shape[0], batch):
        idx = order[i : i + batch]
        xb = x[idx]
        if augment:
            xb = dsa(xb, rng.getrandbits(63))
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.detach()


def _interleaved(reps: int, runners: dict, dev) -> dict[str, list[float]]:
    """Run each runner ``reps`` times, interleaved A B A B ...; returns seconds per run."""
    times = {k: [] for k in runners}
    for r in range(reps):
        for name, fn in runners.items():
            times[name].append(timed(dev, lambda: fn(r)))
    return times


def bench_experts(args, dev) -> dict:
    es = ExpertSettings()
    ds, pre = load_data(args.dataset, args.data_dir)
    n = min(args.expert_images or len(ds.train_labels), len(ds.train_labels))
    keep = torch.randperm(len(ds.train_labels), generator=torch.Generator().manual_seed(0))[:n]
    x = pre.apply(ds.train_images[keep]).to(dev)
    y = ds.train_labels[keep].to(dev)
    spec = make_spec(ds, args.width)
    batch = es.batch
    log(f"[experts] {n} images {tuple(x.shape[1:])}, ConvNet width {spec.width} depth {spec.depth}, batch {batch}, "
        f"SGD lr {es.lr} momentum {es.momentum} wd {es.weight_decay}, DSA {not args.no_dsa}, {args.expert_reps} reps")

    def fresh(seed, plain=False):
        torch.manual_seed(seed)
        net = build_model(spec)
        net = (plain_layers(net) if plain else net).to(dev)
        opt = torch.optim.SGD(net.parameters(), lr=es.lr, momentum=es.momentum, weight_decay=es.weight_decay)
        return net, opt, torch.Generator().manual_seed(seed), random.Random(seed)

    losses = {}

    def run_dpd(r, xs=x, ys=y):
        net, opt, gen, rng = fresh(1000 + r)
        loss_sum, _ = train_epoch(net, opt, xs, ys, batch, gen, rng, not args.no_dsa)
        losses["dpd"] = float(loss_sum) / len(ys)

    def run_bare(r, xs=x, ys=y):
        net, opt, gen, rng = fresh(1000 + r, plain=True)
        losses["bare"] = float(bare_epoch(net, opt, xs, ys, batch, gen, rng, not args.no_dsa))

    # Warm-up (allocator, kernels, thread pool) on two batches each, untimed.
    w = min(2 * batch, n)
    run_dpd(-1, x[:w], y[:w])
    run_bare(-1, x[:w], y[:w])
    times = _interleaved(args.expert_reps, {"dpd": run_dpd, "bare": run_bare}, dev)
    ips = {k: [n / t for t in v] for k, v in times.items()}
    out = {
        "images": n,
        "image_shape": list(x.shape[1:]),
        "width": spec.width,
        "depth": spec.depth,
        "batch": batch,
        "lr": es.lr,
        "momentum": es.momentum,
        "weight_decay": es.weight_decay,
        "dsa": not args.no_dsa,
        "reps": args.expert_reps,
        "seconds": times,
        "images_per_s": ips,
        "median_images_per_s": {k: _median(v) for k, v in ips.items()},
        "last_epoch_loss": losses,
    }
    out["dpd_over_bare"] = out["median_images_per_s"]["dpd"] / out["median_images_per_s"]["bare"]
    log(f"[experts] dpd {out['median_images_per_s']['dpd']:.1f} img/s, bare {out['median_images_per_s']['bare']:.1f} img/s, "
        f"ratio {out['dpd_over_bare']:.3f}")
    return out


# ----------------------------------------------------------------------------- eval


def bench_eval(args, dev) -> dict:
    ev = EvalSettings()
    ds, pre = load_data(args.dataset, args.data_dir)
    idx = class_balanced(ds.train_labels, ds.n_classes, args.eval_ipc, seed=0)
    x = pre.apply(ds.train_images[idx]).to(dev)
    y = ds.train_labels[idx].to(dev)
    spec = make_spec(ds, args.width)
    epochs = args.eval_epochs
    lr = 0.01  # the fixed protocol's lr; the value does not change the work
    log(f"[eval] IPC {args.eval_ipc} ({len(y)} images), ConvNet width {spec.width}, {epochs} epochs per rep, batch {ev.batch}, "
        f"SGD momentum {ev.momentum} wd {ev.weight_decay}, DSA {not args.no_dsa}, {args.eval_reps} reps")

    def fresh(seed, plain=False):
        torch.manual_seed(seed)
        net = build_model(spec)
        net = (plain_layers(net) if plain else net).to(dev)
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=ev.momentum, weight_decay=ev.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[epochs // 2], gamma=0.1)
        return net, opt, sched, torch.Generator().manual_seed(seed), random.Random(seed)

    def run_dpd(r, n_epochs=epochs):
        # train_epoch + a scheduler step per epoch: dpd 0.1.0's evaluation loop (engine.evaluate._train now
        # re-creates its optimiser once at the decay instead; the per-epoch work is the same).
        net, opt, sched, gen, rng = fresh(2000 + r)
        for _ in range(n_epochs):
            train_epoch(net, opt, x, y, ev.batch, gen, rng, not args.no_dsa, count_correct=False)  # as engine.evaluate
            sched.step()

    def run_bare(r, n_epochs=epochs):
        net, opt, sched, gen, rng = fresh(2000 + r, plain=True)
        for _ in range(n_epochs):
            bare_epoch(net, opt, x, y, ev.batch, gen, rng, not args.no_dsa)
            sched.step()

    run_dpd(-1, 2)
    run_bare(-1, 2)
    times = _interleaved(args.eval_reps, {"dpd": run_dpd, "bare": run_bare}, dev)
    eps = {k: [epochs / t for t in v] for k, v in times.items()}
    out = {
        "ipc": args.eval_ipc,
        "images": len(y),
        "width": spec.width,
        "epochs_per_rep": epochs,
        "batch": ev.batch,
        "momentum": ev.momentum,
        "weight_decay": ev.weight_decay,
        "dsa": not args.no_dsa,
        "reps": args.eval_reps,
        "seconds": times,
        "epochs_per_s": eps,
        "median_epochs_per_s": {k: _median(v) for k, v in eps.items()},
    }
    out["dpd_over_bare"] = out["median_epochs_per_s"]["dpd"] / out["median_epochs_per_s"]["bare"]
    out["mtt_protocol_minutes_per_network"] = PROTOCOL_EPOCHS / out["median_epochs_per_s"]["dpd"] / 60
    log(f"[eval] dpd {out['median_epochs_per_s']['dpd']:.2f} epochs/s, bare {out['median_epochs_per_s']['bare']:.2f} epochs/s, "
        f"ratio {out['dpd_over_bare']:.3f}")
    return out


PROTOCOL_EPOCHS = 1000  # MTT evaluation protocol (engine.evaluate.PROTOCOLS["mtt"])


# ----------------------------------------------------------------------------- distill: worker


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _vm_size_bytes() -> int | None:
    try:
        m = re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _plan(rng: random.Random, n_images: int, batch_syn: int, n_steps: int, use_dsa: bool, dev) -> matching.StepPlan:
    """Per-step batches and DSA seeds, drawn by the engine's own planner (recipes.distill_inputs.draw_plan)."""
    s = DistillSettings(syn_steps=n_steps, batch_syn=batch_syn if batch_syn < n_images else None, dsa=use_dsa)
    return draw_plan(rng, n_images, s, dev)


def distill_worker(cfg: dict) -> dict:
    """One configuration, in its own process: build, warm up one iteration, time ``iters``; return JSON."""
    dev = setup_runtime(cfg["device"], cfg["threads"], cfg["cudnn_benchmark"], cfg["host_memory"])
    if dev.type == "cpu" and cfg.get("mem_limit_bytes"):
        # A safety net in case the estimate was wrong: allocation fails (MemoryError/RuntimeError)
        # instead of the kernel's OOM killer picking a process on a shared machine.
        vm = _vm_size_bytes()
        if vm:
            lim = vm + int(cfg["mem_limit_bytes"])
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    # Same imports in every mode before the baseline: constructing a torch.optim optimiser (the
    # reference uses two) pulls in ~150 MB of modules, which is not the algorithm's memory.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.5)
    ds, pre = load_data(cfg["dataset"], cfg["data_dir"])
    ds_s = DistillSettings()
    mode, n_steps = cfg["mode"], cfg["steps"]
    lr_img, lr_lr, lr_teacher = ds_s.lr_img, ds_s.lr_lr, ds_s.lr_teacher

    if cfg.get("experts"):
        from dpd_cli.artifacts.experts import ExpertSet

        experts = ExpertSet(Path(cfg["experts"]))
        spec, pre = experts.spec, experts.preprocess
        m = min(ds_s.expert_epochs, experts.epochs)
        start_cpu, target_cpu = experts.pair(0, 0, m)
        source = f"expert 0 of {experts.folder}, epochs 0 and {m}"

        def fetch_rows():  # per iteration, from the file, as the real loop does
            return experts.pair(0, 0, m)
    else:
        experts = None
        spec = make_spec(ds, cfg["width"])
        torch.manual_seed(0)
        start_cpu = FlatModel(build_model(spec)).flatten()
        target_cpu = start_cpu + 0.01 * torch.randn_like(start_cpu)
        source = "random: PyTorch init, target = start + 0.01 N(0,1)"

        def fetch_rows():
            return start_cpu, target_cpu

    idx = class_balanced(ds.train_labels, ds.n_classes, cfg["ipc"], seed=0)
    images = pre.apply(ds.train_images[idx]).to(dev)
    labels = ds.train_labels[idx].to(dev)
    del ds
    n_images = len(labels)
    batch_syn = min(cfg["batch_syn"] or n_images, n_images)
    prune = pruning.PruneConfig(cfg["prune_ratio"], ds_s.prune_scope, ds_s.prune_criterion)

    if mode == "ref":
        ref = MTTReference(spec, images, labels, lr_teacher, lr_img, lr_lr, batch_syn)
        start_buf, target_buf = MTTReference.buffer_entry(start_cpu, spec), MTTReference.buffer_entry(target_cpu, spec)

        def one_iteration(it: int) -> torch.Tensor:
            # The same DSA seeds as dpd's iteration ``it`` (the reference draws its own batch order).
            seeds = _plan(random.Random(it), n_images, batch_syn, n_steps, cfg["dsa"], dev).seeds
            return ref.iteration(start_buf, target_buf, seeds)

        n_params = sum(t.numel() for t in start_buf)
    else:
        memory, keep = ("low", int(mode[3:])) if mode[3:].isdigit() else (mode, 0)  # lowK: --keep-graphs K
        net = build_model(spec).to(dev)
        fm = FlatModel(net)
        sizes = [layer.numel for layer in fm.layers]
        layer_ids = fm.layer_ids(dev)
        lr = torch.tensor(lr_teacher, device=dev)
        mom_images, mom_lr = torch.zeros_like(images), torch.zeros_like(lr)
        prune_counts = torch.zeros(fm.n_params, dtype=torch.int32, device=dev)
        n_params = fm.n_params

        def one_iteration(it: int) -> torch.Tensor:
            # The body of engine.distill.run's loop (its own helpers where it has them), minus logging
            # and checkpoints.
            rng = random.Random(it)
            start, target = (distill_engine._to_device(v, dev) for v in fetch_rows())
            plan = _plan(rng, n_images, batch_syn, n_steps, cfg["dsa"], dev)
            # The step mask of engine.distill (pruning.Pruner with --prune-mask step): a function of the unroll's end.
            mask = None if prune.ratio <= 0 else (lambda e, t, s: pruning.prune_keep_mask(e, t, s, prune, sizes))
            res = matching.meta_gradient(fm, images, labels, lr, start, target, plan, memory, loss_mask=mask,
                                         keep_graphs=keep)
            with torch.no_grad():
                mom_images.mul_(0.5).add_(res.grad_images)
                images.sub_(lr_img * mom_images)
                mom_lr.mul_(0.5).add_(res.grad_lr)
                lr.sub_(lr_lr * mom_lr)
                if res.keep is not None:
                    dropped = (~res.keep).to(torch.int32)
                    prune_counts.add_(dropped)
                    torch.zeros(len(sizes), device=dev).index_add_(0, layer_ids, dropped.float())
            return res.loss

    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _rss_bytes()
    losses = [one_iteration(0)]  # warm-up, untimed (its memory peak counts: it is the same work)
    times, cpu_times = [], []
    for it in range(1, cfg["iters"] + 1):
        c0 = time.process_time()
        t = timed(dev, lambda: losses.append(one_iteration(it)))
        times.append(t)
        cpu_times.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _rss_bytes()
    losses_f = [float(v) for v in losses]
    return {
        "mode": mode,
        "ipc": cfg["ipc"],
        "steps": n_steps,
        "n_images": n_images,
        "batch_syn": batch_syn,
        "n_params": n_params,
        "width": spec.width,
        "depth": spec.depth,
        "image_shape": list(images.shape[1:]),
        "prune_ratio": cfg["prune_ratio"] if mode != "ref" else 0.0,
        "source": source,
        "seconds": times,
        "s_per_it": _median(times),
        "s_per_step": _median(times) / n_steps,
        # CPU seconds of this process per iteration: on a CPU run, well below threads x s_per_it
        # means the threads were waiting for cores (other load), i.e. the timing is not clean.
        "cpu_s_per_it": _median(cpu_times),
        "base_bytes": base,
        "peak_bytes": peak,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(dev) if dev.type == "cuda" else None,
        "memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "process peak RSS (ru_maxrss)",
        "losses": losses_f,
        "finite": all(math.isfinite(v) for v in losses_f),
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- distill: orchestration


def estimate_peak(done: list[dict], mode: str, ipc: int, steps: int, batch_of) -> float | None:
    """Estimated peak bytes of (mode, ipc, steps) from the configurations measured so far.

    Same IPC, two or more N measured: linear in N through the two largest (per-step growth).
    Same IPC, one N: base + (peak - base) * N / N0 (per-step growth = everything above base).
    Other IPC only: that, scaled by N x images per step. The reference falls back to full's points.
    """
    pts = [r for r in done if r.get("mode") == mode and "peak_bytes" in r]
    if not pts and mode == "ref":
        pts = [r for r in done if r.get("mode") == "full" and "peak_bytes" in r]
    if not pts:
        return None
    same = sorted((r for r in pts if r["ipc"] == ipc), key=lambda r: r["steps"])
    if len(same) >= 2:
        a, b = same[-2], same[-1]
        if b["steps"] == a["steps"]:
            a = same[0]
        if b["steps"] != a["steps"]:
            g = max(0.0, (b["peak_bytes"] - a["peak_bytes"]) / (b["steps"] - a["steps"]))
            return b["peak_bytes"] + (steps - b["steps"]) * g
    if same:
        r = same[-1]
        return r["base_bytes"] + (r["peak_bytes"] - r["base_bytes"]) * steps / r["steps"]
    r = max(pts, key=lambda r: r["steps"] * r["batch_syn"])
    return r["base_bytes"] + (r["peak_bytes"] - r["base_bytes"]) * (steps * batch_of(ipc)) / (r["steps"] * r["batch_syn"])


def default_mem_limit(dev: torch.device) -> float:
    if dev.type == "cuda":
        return 0.8 * torch.cuda.get_device_properties(dev).total_memory
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return 0.8 * int(line.split()[1]) * 1024
    return 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_worker(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr or "").strip().splitlines()[-3:]
        oom = "out of memory" in p.stderr.lower() or "can't allocate memory" in p.stderr.lower() or "MemoryError" in p.stderr
        return {"error": ("out of memory: " if oom else f"exit {p.returncode}: ") + " | ".join(tail)[-400:]}
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "worker printed no result: " + (p.stdout or p.stderr)[-300:]}


def bench_distill(args, dev) -> dict:
    ipcs = [int(v) for v in args.ipc.split(",")]
    steps = [int(v) for v in args.steps.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    limit = args.mem_limit_gb * GIB if args.mem_limit_gb else default_mem_limit(dev)
    probe_ds = load_dataset(args.dataset, Path(args.data_dir) if args.data_dir else None)
    n_classes = probe_ds.n_classes
    del probe_ds

    def batch_of(ipc):
        return min(args.batch_syn or ipc * n_classes, ipc * n_classes)

    log(f"[distill] IPC {ipcs}, N {steps}, modes {modes}, {args.iters} timed iterations after 1 warm-up, "
        f"memory limit {limit / GIB:.1f} GiB, prune ratio {args.prune_ratio}, each configuration in a fresh process")
    done: list[dict] = []
    for ipc in ipcs:
        for n in steps:
            for mode in modes:
                cfg = {
                    "mode": mode, "ipc": ipc, "steps": n, "device": str(dev), "threads": args.threads,
                    "cudnn_benchmark": args.cudnn_benchmark, "host_memory": args.host_memory,
                    "dataset": args.dataset, "data_dir": args.data_dir,
                    "width": args.width, "experts": args.experts, "iters": args.iters, "batch_syn": args.batch_syn,
                    "prune_ratio": args.prune_ratio, "dsa": not args.no_dsa, "mem_limit_bytes": limit,
                }
                est = estimate_peak(done, mode, ipc, n, batch_of)
                tag = f"[distill] IPC {ipc} N {n} {mode:<4}"
                if est is not None and est > limit:
                    r = {"mode": mode, "ipc": ipc, "steps": n, "skipped": f"skipped: needs ~{est / GIB:.1f} GiB", "estimate_bytes": est}
                    log(f"{tag}: skipped, needs ~{est / GIB:.1f} GiB > limit {limit / GIB:.1f} GiB")
                else:
                    t0 = time.perf_counter()
                    r = run_worker(cfg, args.worker_timeout)
                    r.update({"mode": mode, "ipc": ipc, "steps": n, "estimate_bytes": est, "wall_s": time.perf_counter() - t0})
                    if "error" in r:
                        log(f"{tag}: FAILED {r['error']}")
                    else:
                        log(f"{tag}: {r['s_per_it']:.3f} s/it, peak {r['peak_bytes'] / GIB:.2f} GiB"
                            + (f" (estimated {est / GIB:.2f})" if est else "") + ("" if r["finite"] else "  [non-finite loss]"))
                done.append(r)
    return {"configs": done, "summary": summarize_distill(done), "mem_limit_bytes": limit, "iters": args.iters,
            "prune_ratio": args.prune_ratio, "dsa": not args.no_dsa, "experts": args.experts}


def summarize_distill(done: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["ipc"], r["steps"]) for r in done})
    get = {(r["ipc"], r["steps"], r["mode"]): r for r in done}
    for ipc, n in keys:
        row = {"ipc": ipc, "steps": n}
        for m in MODES:
            r = get.get((ipc, n, m))
            if r is None:
                continue
            if "s_per_it" in r:
                row[f"{m}_s_per_it"] = r["s_per_it"]
                row[f"{m}_peak_bytes"] = r["peak_bytes"]
            else:
                row[f"{m}_note"] = r.get("skipped") or r.get("error")
        if "low_s_per_it" in row and "full_s_per_it" in row:
            row["low_over_full_time"] = row["low_s_per_it"] / row["full_s_per_it"]
            row["low_over_full_mem"] = row["low_peak_bytes"] / row["full_peak_bytes"]
        if "full_s_per_it" in row and "ref_s_per_it" in row:
            row["full_over_ref_time"] = row["full_s_per_it"] / row["ref_s_per_it"]
            row["full_over_ref_mem"] = row["full_peak_bytes"] / row["ref_peak_bytes"]
        kept = sorted((r for r in done if r["ipc"] == ipc and r["steps"] == n and r["mode"][3:].isdigit() and "s_per_it" in r),
                      key=lambda r: int(r["mode"][3:]))
        if kept and "full_s_per_it" in row:  # lowK: where keeping K steps' graphs sits between low and full
            row["keep_graphs"] = [{"k": int(r["mode"][3:]), "s_per_it": r["s_per_it"], "peak_bytes": r["peak_bytes"],
                                   "over_full_time": r["s_per_it"] / row["full_s_per_it"],
                                   "over_full_mem": r["peak_bytes"] / row["full_peak_bytes"]} for r in kept]
        rows.append(row)
    return rows


def low_growth(done: list[dict]) -> list[dict]:
    out = []
    for ipc in sorted({r["ipc"] for r in done}):
        low = sorted((r for r in done if r["ipc"] == ipc and r["mode"] == "low" and "peak_bytes" in r), key=lambda r: r["steps"])
        if len(low) >= 2:
            a, b = low[0], low[-1]
            out.append({
                "ipc": ipc, "from_steps": a["steps"], "to_steps": b["steps"],
                "peak_growth_pct": 100 * (b["peak_bytes"] / a["peak_bytes"] - 1),
                "above_base_growth_pct": (100 * ((b["peak_bytes"] - b["base_bytes"]) / (a["peak_bytes"] - a["base_bytes"]) - 1)
                                          if a["peak_bytes"] - a["base_bytes"] > 2**20 else None),
            })
    return out


# ----------------------------------------------------------------------------- report


def _f(v, fmt="{:.3f}", none="–"):
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"## dpd speed — {env.get('gpu') or env['cpu']} ({env['device']}, torch {env['torch']}, "
             f"{env['torch_threads']} threads via torch.set_num_threads)", ""]
    la = env.get("loadavg_start")
    if la is not None and env["device"] == "cpu" and la > 0.5:
        lines += [f"**warning:** 1-min load average was {la:.1f} at the start ({env['cores_available']} cores): other processes "
                  "were using the CPU, so these timings are not trustworthy (OpenMP threads slow down badly on shared cores).", ""]
    if "experts" in result:
        e = result["experts"]
        lines += [
            f"### experts: images/s, ConvNet-{e['width']} d{e['depth']}, {e['images']} images {tuple(e['image_shape'])}, batch {e['batch']}, "
            f"SGD lr {e['lr']}, DSA {'on' if e['dsa'] else 'off'}, median of {e['reps']} interleaved epochs",
            "",
            "| trainer | images/s (median) | runs | dpd / bare |",
            "|---|---|---|---|",
            f"| dpd `train_epoch` | {e['median_images_per_s']['dpd']:.1f} | {', '.join(f'{v:.1f}' for v in e['images_per_s']['dpd'])} | {e['dpd_over_bare']:.3f} |",
            f"| bare PyTorch loop | {e['median_images_per_s']['bare']:.1f} | {', '.join(f'{v:.1f}' for v in e['images_per_s']['bare'])} | |",
            "",
        ]
    if "distill" in result:
        d = result["distill"]
        kind = next((r["memory_kind"] for r in d["configs"] if "memory_kind" in r), "peak memory")
        any_cfg = next((r for r in d["configs"] if "width" in r), {})
        lines += [
            f"### distill: seconds per iteration and {kind}; ConvNet-{any_cfg.get('width', '?')}, "
            f"{any_cfg.get('n_params', '?')} params, DSA {'on' if d['dsa'] else 'off'}, prune ratio {d['prune_ratio']} (ref: MTT, 0), "
            f"median of {d['iters']} iterations after 1 warm-up, fresh process each, memory limit {d['mem_limit_bytes'] / GIB:.1f} GiB",
            "",
            "| IPC | N | full s/it | low s/it | ref s/it | full peak GiB | low peak GiB | ref peak GiB | low/full time | low/full mem | full/ref time |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in d["summary"]:
            def cell(m, key, scale=1.0, fmt="{:.3f}", note=True):
                if f"{m}_{key}" in row:
                    return fmt.format(row[f"{m}_{key}"] / scale)
                return (row.get(f"{m}_note") or "–") if note else "–"

            lines.append(
                f"| {row['ipc']} | {row['steps']} | "
                + " | ".join(cell(m, "s_per_it") for m in MODES) + " | "
                + " | ".join(cell(m, "peak_bytes", GIB, "{:.2f}", note=False) for m in MODES)
                + f" | {_f(row.get('low_over_full_time'))} | {_f(row.get('low_over_full_mem'))} | {_f(row.get('full_over_ref_time'))} |"
            )
        kept = [(row, k) for row in d["summary"] for k in row.get("keep_graphs", [])]
        if kept:
            lines += ["", "low memory keeping the last K steps' graphs (`--keep-graphs K`), against full memory:", "",
                      "| IPC | N | K | s/it | peak GiB | time / full | memory / full |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {row['ipc']} | {row['steps']} | {k['k']} | {k['s_per_it']:.3f} | {k['peak_bytes'] / GIB:.2f} | "
                      f"{k['over_full_time']:.3f} | {k['over_full_mem']:.3f} |" for row, k in kept]
        for g in d.get("low_growth", []):
            lines.append("")
            lines.append(f"low-memory peak growth, IPC {g['ipc']}, N {g['from_steps']} → {g['to_steps']}: "
                         f"{g['peak_growth_pct']:+.1f}% of the peak"
                         + ("" if g["above_base_growth_pct"] is None else
                            f" ({g['above_base_growth_pct']:+.1f}% of the part above the pre-iteration baseline)"))
        bad = [r for r in d["configs"] if "finite" in r and not r["finite"]]
        if bad:
            lines.append(f"\nwarning: non-finite loss in {len(bad)} configuration(s); timings may not be representative")
        lines.append("")
    if "eval" in result:
        v = result["eval"]
        lines += [
            f"### eval: epochs/s, IPC {v['ipc']} ({v['images']} images), ConvNet-{v['width']}, batch {v['batch']}, SGD momentum "
            f"{v['momentum']} wd {v['weight_decay']}, DSA {'on' if v['dsa'] else 'off'}, {v['epochs_per_rep']} epochs × {v['reps']} interleaved reps",
            "",
            "| trainer | epochs/s (median) | runs | dpd / bare |",
            "|---|---|---|---|",
            f"| dpd `train_epoch` | {v['median_epochs_per_s']['dpd']:.2f} | {', '.join(f'{x:.2f}' for x in v['epochs_per_s']['dpd'])} | {v['dpd_over_bare']:.3f} |",
            f"| bare PyTorch loop | {v['median_epochs_per_s']['bare']:.2f} | {', '.join(f'{x:.2f}' for x in v['epochs_per_s']['bare'])} | |",
            "",
            f"One MTT-protocol evaluation network ({PROTOCOL_EPOCHS} epochs) ≈ {v['mtt_protocol_minutes_per_network']:.1f} min here.",
            "",
        ]
    if "reference_check" in result:
        c = result["reference_check"]
        lines.append(f"reference check (float64, 1 iteration, MTT vs dpd full ρ=0): loss rel {c['loss_rel']:.1e}, "
                     f"dL/dX rel {c['grad_images_rel']:.1e}, dL/dα rel {c['grad_lr_rel']:.1e} → {'OK' if c['ok'] else 'MISMATCH'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy sizes and 1 thread for every option not given (validates the script, < 1 min)")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: experts,distill,eval")
    p.add_argument("--out", help="write all numbers as JSON here")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: cores available)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True (dpd does not set it)")
    p.add_argument("--host-memory", choices=["reuse", "system"], default="reuse",
                   help="CPU allocator as dpd's --host-memory (default reuse, dpd's default; applies to every side)")
    p.add_argument("--dataset", default="fashion-mnist-mini", help="dpd dataset name (default: the embedded mini set)")
    p.add_argument("--data-dir", default=None, help="dataset folder (imagefolder: the folder with train/ and test/)")
    p.add_argument("--width", type=int, default=128, help="ConvNet width (default 128, the real default)")
    p.add_argument("--no-dsa", action="store_true", help="turn DSA off everywhere")
    g = p.add_argument_group("experts")
    g.add_argument("--expert-images", type=int, default=None, help="training images per epoch (default: all)")
    g.add_argument("--expert-reps", type=int, default=3, help="timed epochs per trainer (default 3)")
    g = p.add_argument_group("distill")
    g.add_argument("--ipc", default="10", help="comma-separated IPC values (default 10)")
    g.add_argument("--steps", default="10,20,40,80", help="comma-separated N (default 10,20,40,80)")
    g.add_argument("--modes", default="full,low,ref", help="comma-separated: full, low, ref, lowK (low memory keeping "
                   "the last K steps' graphs, dpd's --keep-graphs K) (default full,low,ref)")
    g.add_argument("--iters", type=int, default=2, help="timed iterations per configuration (default 2)")
    g.add_argument("--batch-syn", type=int, default=None, help="synthetic images per student step (default all)")
    g.add_argument("--prune-ratio", type=float, default=DistillSettings().prune_ratio, help="rho for dpd (default: dpd's default)")
    g.add_argument("--experts", default=None, help="an experts folder: use expert 0's epochs 0 and M instead of random parameters")
    g.add_argument("--mem-limit-gb", type=float, default=None, help="skip configurations whose estimated peak exceeds this many GiB (default 80%% of RAM / GPU memory)")
    g.add_argument("--worker-timeout", type=float, default=3600, help="seconds per configuration (default 3600)")
    g = p.add_argument_group("eval")
    g.add_argument("--eval-ipc", type=int, default=10, help="images per class (default 10)")
    g.add_argument("--eval-epochs", type=int, default=20, help="epochs per timed repetition (default 20)")
    g.add_argument("--eval-reps", type=int, default=5, help="repetitions per trainer (default 5)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:  # toy sizes for every option left at its default
        for k, v in SMOKE.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    args.threads = args.threads or default_threads()
    bad = [s for s in args.only.split(",") if s not in SECTIONS]
    if bad:
        p.error(f"--only: unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    bad = [m for m in args.modes.split(",") if m not in MODES and not re.fullmatch(r"low\d+", m)]
    if bad:
        p.error(f"--modes: unknown mode(s) {bad}; choose from {', '.join(MODES)}, lowK")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        print(json.dumps(distill_worker(json.loads(args.worker))))
        return 0
    t0 = time.perf_counter()
    dev = setup_runtime(args.device, args.threads, args.cudnn_benchmark, args.host_memory)
    result = {"environment": environment(args, dev), "args": {k: v for k, v in vars(args).items() if k != "worker"}}
    log(f"torch {torch.__version__}, device {dev}, torch.set_num_threads({args.threads}) "
        f"(cores available: {default_threads()}){' — SMOKE sizes' if args.smoke else ''}")
    sections = args.only.split(",")
    if "experts" in sections:
        result["experts"] = bench_experts(args, dev)
        _free(dev)
    if "eval" in sections:
        result["eval"] = bench_eval(args, dev)
        _free(dev)
    if "distill" in sections:
        result["distill"] = bench_distill(args, dev)
        result["distill"]["low_growth"] = low_growth(result["distill"]["configs"])
        if args.smoke or "ref" in args.modes:
            result["reference_check"] = check_against_dpd(str(dev))
    result["total_wall_s"] = time.perf_counter() - t0
    result["environment"]["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result["total_cpu_s_this_process"] = time.process_time()
    text = markdown(result)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        Path(args.out).with_suffix(".md").write_text(text + "\n")
        log(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
    failed = [r for r in result.get("distill", {}).get("configs", []) if "error" in r]
    ok_ref = result.get("reference_check", {}).get("ok", True)
    return 1 if failed or not ok_ref else 0


def _free(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
