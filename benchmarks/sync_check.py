r"""Host-device synchronisations per distillation iteration on CUDA, and where they happen.

Runs ``DistillRecipe`` (the loop ``dpd distill`` runs) on an experts folder with
``torch.cuda.set_sync_debug_mode("warn")``: every operation that makes the host wait for the GPU
(``.item()``, ``.tolist()``, boolean indexing, a blocking copy) raises a warning, which is counted
by the Python line that caused it. ``--iters`` iterations between two metric flushes are counted
apart from the flush itself (one sync per ``--log-every`` window is by design). The goal is zero
syncs inside an iteration: then the GPU never idles waiting for the host between iterations.
Each memory mode is counted with CUDA graphs on (the default; the warm-up iteration captures and
checks them) and off.

    python benchmarks/sync_check.py --experts EX --ipc 10 --steps 30 --out sync.json

On a machine without CUDA it says so and exits 0 (nothing to count); ``--device cpu`` runs the
same loop without counting, to check the script itself.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import threading
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpd_cli.recipes.distill import DistillRecipe  # noqa: E402
from dpd_cli.config.settings import resolve  # noqa: E402


def _count(fn, cuda: bool) -> collections.Counter:
    """Synchronisations during ``fn()``, by where they come from: the innermost dpd line, then the warning's own."""
    where = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        # The sync warning itself; not the once-per-process notice that the debug mode is a prototype
        # ("Synchronization debug mode is a prototype feature ..."), raised by set_sync_debug_mode.
        if "called a synchronizing" not in str(message):
            return
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if "dpd_cli" in f.filename]
        at = f"{Path(filename).name}:{lineno}"
        if ours:
            where[f"{Path(ours[-1].filename).name}:{ours[-1].lineno} ({ours[-1].line}) -> {at}"] += 1
        else:  # not from dpd's own lines: say which thread and which calls led there
            calls = " < ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack[::-1][:6])
            where[f"{at} [thread {threading.current_thread().name}: {calls}]"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    return where


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=Path, required=True)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--steps", type=int, default=10, help="N, student steps per iteration")
    p.add_argument("--iters", type=int, default=5, help="iterations counted (one metrics window)")
    p.add_argument("--prune-ratio", type=float, default=0.01)
    p.add_argument("--memory", choices=["full", "low"], default="full")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    cuda = args.device != "cpu"
    if cuda and not torch.cuda.is_available():
        print("sync_check: no CUDA device here; nothing to count (--device cpu runs the loop uncounted, to check this script)")
        return
    results = {}
    memories = [args.memory] if args.memory == "low" else ["full", "low"]
    for memory, graphs in [(m, g) for g in (True, False) for m in memories]:
        name = memory if graphs else f"{memory}, no CUDA graphs"
        s = resolve("distill", {"experts": str(args.experts), "ipc": args.ipc, "syn_steps": args.steps, "memory": memory,
                                "cuda_graphs": graphs,
                                "prune_ratio": args.prune_ratio, "device": args.device, "iterations": args.iters + 2,
                                "max_start_epoch": 1, "expert_epochs": 1, "lr_img": 1.0, "lr_lr": 0.0,
                                "log_every": args.iters + 2, "checkpoint_every": 1000,
                                "out": str(Path(tempfile.mkdtemp()) / "run"), "force": True})
        with DistillRecipe(s) as recipe:
            recipe.step()  # warm-up: first-touch allocations, cuDNN/cuBLAS handles
            recipe.flush()
            if cuda:
                torch.cuda.synchronize()
            in_steps = _count(lambda: [recipe.step() for _ in range(args.iters)], cuda)
            in_flush = _count(recipe.flush, cuda)
        results[name] = {"iterations": args.iters, "syncs_in_iterations": sum(in_steps.values()),
                           "per_iteration": sum(in_steps.values()) / args.iters, "where": dict(in_steps.most_common()),
                           "syncs_in_flush": sum(in_flush.values()), "flush_where": dict(in_flush.most_common())}
        r = results[name]
        if not cuda:
            print(f"{name}: {args.iters} iterations and a flush ran on the CPU (syncs are counted only on CUDA)")
            continue
        print(f"{name}: {r['per_iteration']:.1f} host syncs per iteration ({r['syncs_in_iterations']} in {args.iters}), "
              f"{r['syncs_in_flush']} in the metrics flush")
        for line, n in in_steps.most_common(8):
            print(f"    {n:4d}  {line}")
    out = {"ipc": args.ipc, "steps": args.steps, "prune_ratio": args.prune_ratio, "gpu": torch.cuda.get_device_name() if cuda else None,
           "torch": torch.__version__, "modes": results}
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
