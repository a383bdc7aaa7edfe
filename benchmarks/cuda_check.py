#!/usr/bin/env python3
"""Does ``matching.meta_gradient`` give the same numbers on CUDA as on the CPU? (float64, tiny problem)

    python benchmarks/cuda_check.py --device cuda --out bench-out/cuda_check.json
    python benchmarks/cuda_check.py --device cpu        # validates the script itself (CPU vs CPU)

Checks, each a max-abs difference relative to the max-abs value, tolerance ``--rtol`` (1e-8):

1. ``device`` vs CPU, DSA off (the two devices draw different random numbers, so augmented
   runs cannot be compared across devices), for memory ``full`` and ``low`` and prune
   settings rho = 0 (MTT), 0.1 global, 0.1 per layer, full batch and mini-batches:
   loss, dL/dX (images), dL/dalpha (lr), and the pruning mask.
2. On ``device`` with DSA on: ``low`` vs ``full`` (the low-memory mode replays each step's
   augmentation from its seed; this is what breaks if replay is not deterministic there), and
   ``low`` keeping half the steps' graphs (``--keep-graphs``) vs ``full``, with mini-batches.
3. The reference MTT loop (``benchmarks/mtt_reference.py``) vs dpd ``full`` on ``device``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from dpd_cli.core import matching, pruning
from dpd_cli.models import FlatModel, ModelSpec, build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mtt_reference import check_against_dpd  # noqa: E402

SPEC = ModelSpec("convnet", 3, (16, 16), 4, width=8, depth=2)
N_IMAGES, N_STEPS = 8, 4


def problem(seed: int = 0, dtype=torch.float64):
    """CPU tensors of one tiny distillation iteration."""
    torch.manual_seed(seed)
    fm = FlatModel(build_model(SPEC).to(dtype))
    start = fm.flatten()
    target = start + 0.05 * torch.randn_like(start)
    images = torch.randn(N_IMAGES, 3, 16, 16, dtype=dtype)
    labels = torch.arange(SPEC.n_classes).repeat_interleave(N_IMAGES // SPEC.n_classes)
    return fm, start, target, images, labels


def run(device: str, memory: str, prune: pruning.PruneConfig, dsa_on: bool, batch: int | None, seed: int = 0,
        dtype=torch.float64, keep_graphs: int = 0):
    fm, start, target, images, labels = problem(seed, dtype)
    dev = torch.device(device)
    fm.module.to(dev)
    rng = random.Random(seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    batches = [None if batch is None else torch.randperm(N_IMAGES, generator=g)[:batch].to(dev) for _ in range(N_STEPS)]
    seeds = [rng.getrandbits(63) if dsa_on else None for _ in range(N_STEPS)]
    plan = matching.StepPlan(batches, seeds)
    sizes = [layer.numel for layer in fm.layers]
    mask = None if prune.ratio <= 0 else (lambda e, t, s: pruning.prune_keep_mask(e, t, s, prune, sizes))
    res = matching.meta_gradient(fm, images.to(dev), labels.to(dev), torch.tensor(0.02, dtype=dtype, device=dev),
                                 start.to(dev), target.to(dev), plan, memory, loss_mask=mask, keep_graphs=keep_graphs)
    return {"loss": res.loss.cpu(), "grad_images": res.grad_images.cpu(), "grad_lr": res.grad_lr.cpu(),
            "keep": None if res.keep is None else res.keep.cpu()}


def compare(a: dict, b: dict) -> dict:
    rel = lambda x, y: float((x - y).abs().max() / y.abs().max().clamp_min(1e-300))  # noqa: E731
    out = {k: rel(a[k], b[k]) for k in ("loss", "grad_images", "grad_lr")}
    out["mask_equal"] = (a["keep"] is None and b["keep"] is None) or (
        a["keep"] is not None and b["keep"] is not None and bool(torch.equal(a["keep"], b["keep"])))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rtol", type=float, default=1e-8)
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    prunes = {"rho0": pruning.PruneConfig(0.0), "rho0.1-global": pruning.PruneConfig(0.1, "global"),
              "rho0.1-layer": pruning.PruneConfig(0.1, "layer")}
    rows = []
    for memory in ("full", "low"):
        for pname, prune in prunes.items():
            for batch in (None, 4):
                c = compare(run(args.device, memory, prune, False, batch), run("cpu", memory, prune, False, batch))
                rows.append({"check": f"{args.device} vs cpu", "memory": memory, "prune": pname, "batch": batch or "all", "dsa": False, **c})
    for pname in ("rho0", "rho0.1-global"):
        c = compare(run(args.device, "low", prunes[pname], True, None), run(args.device, "full", prunes[pname], True, None))
        rows.append({"check": f"low vs full on {args.device}", "memory": "low/full", "prune": pname, "batch": "all", "dsa": True, **c})
        c = compare(run(args.device, "low", prunes[pname], True, 4, keep_graphs=N_STEPS // 2),
                    run(args.device, "full", prunes[pname], True, 4))
        rows.append({"check": f"low keeping {N_STEPS // 2} graphs vs full on {args.device}", "memory": "low/full",
                     "prune": pname, "batch": 4, "dsa": True, **c})
    ref = check_against_dpd(args.device, rtol=1e-9)
    rows.append({"check": f"MTT reference vs dpd full on {args.device}", "memory": "full", "prune": "rho0", "batch": "all", "dsa": True,
                 "loss": ref["loss_rel"], "grad_images": ref["grad_images_rel"], "grad_lr": ref["grad_lr_rel"], "mask_equal": True})
    for r in rows:
        r["ok"] = r["mask_equal"] and max(r["loss"], r["grad_images"], r["grad_lr"]) <= args.rtol
    # Information only: float32 across devices (TF32 convolutions on Ampere+ show up here as ~1e-3).
    c = compare(run(args.device, "full", prunes["rho0"], False, None, dtype=torch.float32),
                run("cpu", "full", prunes["rho0"], False, None, dtype=torch.float32))
    rows.append({"check": f"float32 {args.device} vs cpu (info, not checked)", "memory": "full", "prune": "rho0", "batch": "all",
                 "dsa": False, **c, "ok": None})
    ok = all(r["ok"] for r in rows if r["ok"] is not None)
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    lines = [f"### meta_gradient on {args.device} ({name}) vs reference, float64, tolerance {args.rtol:g} relative", "",
             "| check | memory | prune | batch | DSA | loss rel | dL/dX rel | dL/dα rel | mask | ok |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['memory']} | {r['prune']} | {r['batch']} | {'on' if r['dsa'] else 'off'} | {r['loss']:.1e} | "
                     f"{r['grad_images']:.1e} | {r['grad_lr']:.1e} | {'same' if r['mask_equal'] else 'DIFFERS'} | {'info' if r['ok'] is None else 'OK' if r['ok'] else 'FAIL'} |")
    if args.device.startswith("cuda"):
        lines.append(f"\ncuDNN TF32 allowed: {torch.backends.cudnn.allow_tf32}; matmul TF32: {torch.backends.cuda.matmul.allow_tf32}")
    lines.append("")
    lines.append(f"**{'all checks pass' if ok else 'SOME CHECKS FAIL'}**")
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": args.device, "name": name, "torch": torch.__version__, "ok": ok, "rows": rows}, indent=2))
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
