r"""How closely a captured CUDA graph reproduces the eager meta-gradient, next to how closely eager reproduces itself.

For ConvNet-128 on CIFAR-10-sized images (random pixels; the numbers, not the data, matter here),
IPC 10, N steps, each configuration (memory mode, DSA on/off, prune ratio, cuDNN deterministic or
not) computes one iteration's meta-gradient:

* ``engine``: ``matching.meta_gradient`` with the engine's own plan (``dsa`` per step), as without graphs;
* ``eager 1``, ``eager 2``: the static-buffer computation a graph records, run twice without a graph;
* ``replay 1``, ``replay 2``: the captured graph, replayed twice;

and reports relative differences in norm (loss, dL/dX, dL/dalpha) and the fraction of loss-mask
entries that differ, plus whether ``engine.graphs``'s check would keep the graph.

    python benchmarks/graph_check.py --device cuda --out graph_check.json     # writes .json and .md

On a CPU (``--device cpu``, to check the script) there is no capture: the replay columns are empty.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpd_cli.recipes import distill as distill_engine  # noqa: E402
from dpd_cli.core import graphs, matching  # noqa: E402
from dpd_cli.core.pruning import PruneConfig, Pruner  # noqa: E402
from dpd_cli.models import FlatModel, ModelSpec, build_model  # noqa: E402
from dpd_cli.config.settings import DistillSettings  # noqa: E402


def one(args, dev, memory: str, dsa: bool, ratio: float, deterministic: bool) -> dict:
    torch.backends.cudnn.deterministic = deterministic
    torch.manual_seed(0)
    fm = FlatModel(build_model(ModelSpec("convnet", 3, (32, 32), 10, args.width, 3)).to(dev))
    n = 10 * args.ipc
    images = torch.randn(n, 3, 32, 32, device=dev)
    labels = torch.arange(n, device=dev) // args.ipc
    lr = torch.tensor(0.01, device=dev)
    start = fm.flatten()
    target = start + 0.01 * torch.randn_like(start)
    s = DistillSettings(syn_steps=args.steps, batch_syn=None, dsa=dsa)
    plan = distill_engine._plan(random.Random(1), n, s, dev)
    mask_for = Pruner(PruneConfig(ratio=ratio), [layer.numel for layer in fm.layers]).loss_mask
    engine = graphs._copy(matching.meta_gradient(fm, images, labels, lr, start.clone(), target.clone(), plan, memory,
                                                 loss_mask=mask_for(ratio)))
    inputs = graphs.StaticInputs(fm.n_params, args.steps, None, tuple(images.shape), dsa, dev, images.dtype)
    inputs.load(start, target, plan)

    def fn():
        return matching.meta_gradient(fm, images, labels, lr, inputs.start, inputs.target, inputs.plan, memory,
                                      loss_mask=mask_for(ratio))

    cap = graphs.CudaCapture(dev) if dev.type == "cuda" else None
    eager1 = cap.warm_up(fn) if cap else graphs._copy(fn())
    eager2 = cap.warm_up(fn) if cap else graphs._copy(fn())
    row = {"memory": memory, "dsa": dsa, "ratio": ratio, "cudnn_deterministic": deterministic,
           "eager2_vs_eager1": graphs.differences(eager2, eager1), "engine_vs_eager1": graphs.differences(engine, eager1)}
    if cap:
        graph, out = cap.capture(fn, None)
        graph.replay()
        replay1 = graphs._copy(out)
        graph.replay()
        row["replay1_vs_eager1"] = graphs.differences(replay1, eager1)
        row["replay2_vs_replay1"] = graphs.differences(out, replay1)
        strict = graphs.close_enough(replay1, eager1)
        row["kept"] = strict is None or graphs.close_enough(replay1, eager1, spread=row["eager2_vs_eager1"]) is None
        row["kept_how"] = "within 1e-6" if strict is None else ("within 10x the eager spread" if row["kept"] else "refused")
        del graph, out
        torch.cuda.empty_cache()
    torch.backends.cudnn.deterministic = False
    return row


def fmt(d: dict | None) -> str:
    if d is None:
        return "–"
    worst = max(v for k, v in d.items() if k != "mask")
    return f"{worst:.1e}" + (f" (mask {d['mask']:.1e})" if d["mask"] else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--out", type=Path, required=True, help="JSON file; the Markdown table goes next to it (.md)")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is available to torch.")
    configs = [("full", True, 0.0, False), ("low", True, 0.0, False), ("full", True, 0.01, False), ("low", True, 0.01, False),
               ("full", False, 0.0, False), ("full", False, 0.0, True), ("full", True, 0.0, True), ("low", False, 0.01, True)]
    rows = [one(args, dev, *c) for c in configs]
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    lines = [f"### CUDA graph vs eager — {gpu}, torch {torch.__version__}, ConvNet-{args.width}, IPC {args.ipc}, N {args.steps}, "
             f"all images per step; cuDNN TF32 {torch.backends.cudnn.allow_tf32}, matmul TF32 {torch.backends.cuda.matmul.allow_tf32}",
             "",
             "Largest relative difference (in norm) over loss, dL/dX and dL/dalpha; mask: fraction of loss-mask entries that differ.",
             "",
             "| memory | DSA | ρ | cuDNN deterministic | eager 2 vs eager 1 | replay 1 vs eager 1 | replay 2 vs replay 1 | engine (dsa) vs eager 1 | graph kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['memory']} | {'on' if r['dsa'] else 'off'} | {r['ratio']:g} | {'yes' if r['cudnn_deterministic'] else 'no'} | "
                     f"{fmt(r['eager2_vs_eager1'])} | {fmt(r.get('replay1_vs_eager1'))} | {fmt(r.get('replay2_vs_replay1'))} | "
                     f"{fmt(r['engine_vs_eager1'])} | {r.get('kept_how', '–')} |")
    md = "\n".join(lines) + "\n"
    print(md)
    args.out.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "ipc": args.ipc, "steps": args.steps,
                                    "width": args.width, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
