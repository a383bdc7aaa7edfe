r"""Seconds per distillation iteration and peak memory per rank, one process or data parallel under torchrun.

Drives ``dpd_cli.recipes.distill.DistillRecipe`` (the loop ``dpd distill`` runs) on an experts folder:
``--warmup`` untimed iterations, then ``--iters`` timed ones (the device synchronised around each),
in a scratch run directory. Under torchrun every rank reports its own times and peak memory
(``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on the CPU) and rank 0 writes
them all. Settings the experts folder decides (dataset, network, ZCA) come from it.

Examples (from the repository root):

    # the CPU comparison of docs/results.md: 2 processes x 1 thread against 1 process x 2 threads
    python benchmarks/dp_bench.py --experts EX --ipc 10 --steps 20 --threads 2 --out one.json
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/dp_bench.py --experts EX --ipc 10 \
        --steps 20 --threads 1 --out two.json
    # one GPU, two ranks (gloo), IPC 50 N 30
    torchrun --standalone --nproc-per-node 2 benchmarks/dp_bench.py --experts EX --ipc 50 --steps 30 \
        --device cuda:0 --out dp-gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpd_cli.recipes.distill import DistillRecipe  # noqa: E402
from dpd_cli.config.settings import resolve  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=Path, required=True)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="N, student steps per iteration")
    p.add_argument("--batch-syn", type=int, default=None)
    p.add_argument("--memory", choices=["full", "low"], default="full")
    p.add_argument("--prune-ratio", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    scratch = Path(os.environ.get("DP_BENCH_RUN", tempfile.gettempdir())) / f"dp-bench-w{world}"
    s = resolve("distill", {"experts": str(args.experts), "ipc": args.ipc, "syn_steps": args.steps, "batch_syn": args.batch_syn,
                            "memory": args.memory, "prune_ratio": args.prune_ratio, "device": args.device,
                            "threads": args.threads, "iterations": args.warmup + args.iters + 1, "max_start_epoch": 1,
                            "expert_epochs": 1, "lr_img": 1.0, "lr_lr": 0.0, "out": str(scratch), "force": True,
                            "log_every": 1000})
    with DistillRecipe(s) as recipe:
        device = recipe.device
        for _ in range(args.warmup):
            recipe.step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            recipe.step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        mine = {"rank": rank, "s_per_it": times, "median_s": statistics.median(times), "peak_bytes": peak,
                "threads": torch.get_num_threads(), "device": str(device)}
        everyone = recipe.group.gather_objects(mine) if recipe.group is not None else [mine]
    if rank == 0:
        result = {"world": world, "ipc": args.ipc, "steps": args.steps, "batch_syn": args.batch_syn, "memory": args.memory,
                  "prune_ratio": args.prune_ratio, "n_params": recipe.fm.n_params, "experts": str(args.experts),
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
                  "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "ranks": everyone,
                  "median_s": max(r["median_s"] for r in everyone)}
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "ranks"}))
        for r in everyone:
            print(f"rank {r['rank']}: median {r['median_s']:.3f} s/it ({', '.join(f'{t:.3f}' for t in r['s_per_it'])}), "
                  f"peak {r['peak_bytes'] / 2**30:.2f} GiB, {r['threads']} threads, {r['device']}")


if __name__ == "__main__":
    main()
