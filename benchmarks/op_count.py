#!/usr/bin/env python3
r"""Size of one distillation student step's autograd graph: nodes, aten ops, saved tensors.

    python benchmarks/op_count.py                    # ConvNet-128, 28x28 grey, IPC 10, DSA off and on
    python benchmarks/op_count.py --json out.json

One student step is what ``matching.meta_gradient`` (full) does per unrolled step, and the outer
backward through it: ``theta_1 = theta_0 - alpha * grad_theta CE(f(DSA(X); theta_0), Y)`` with
``create_graph=True``, then ``grad(||theta_1 - target||^2, [X, alpha])``. Reported:

* ``graph_nodes``: distinct autograd nodes reachable from the loss through ``next_functions``
  (what the outer backward executes), with a per-type breakdown;
* ``aten_ops``: aten operator calls recorded by ``torch.profiler`` for forward + inner grad + outer
  backward (every dispatcher call, nested ones included, so also views and reshapes);
* ``saved_bytes``: bytes of the distinct tensors the graph saves for the outer backward
  (``torch.autograd.graph.saved_tensors_hooks``, counted once per storage).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch
import torch.nn.functional as F

from dpd_cli.augment import dsa
from dpd_cli.models import FlatModel, ModelSpec, build_model


def graph_nodes(root) -> collections.Counter:
    seen, stack, kinds = set(), [root], collections.Counter()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds[type(node).__name__] += 1
        stack.extend(fn for fn, _ in node.next_functions)
    return kinds


# Leaf aten ops that move no data: views, allocations, metadata.
_NO_COMPUTE = {
    "aten::view", "aten::as_strided", "aten::reshape", "aten::expand", "aten::slice", "aten::narrow", "aten::t",
    "aten::transpose", "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::split", "aten::split_with_sizes",
    "aten::detach", "aten::alias", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resize_",
    "aten::select", "aten::unflatten", "aten::flatten", "aten::_unsafe_view", "aten::lift_fresh", "aten::result_type",
    "aten::to", "aten::contiguous", "aten::expand_as", "aten::view_as", "aten::_reshape_alias", "aten::set_",
}


def aten_ops(prof) -> tuple[collections.Counter, collections.Counter]:
    """(every aten call, the leaf calls that compute: no aten call below them, not a view/allocation)."""
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    every = collections.Counter(e.name for e in events)
    leaf = collections.Counter(
        e.name for e in events
        if e.name not in _NO_COMPUTE and not any(c.name.startswith("aten::") for c in e.cpu_children)
    )
    return every, leaf


def one_step(fm: FlatModel, x, y, theta0, alpha, target, seed):
    """Forward + inner grad (create_graph) + the matching loss; returns (loss, x, alpha)."""
    x = x.detach().requires_grad_(True)
    a = alpha.detach().requires_grad_(True)
    theta = theta0.detach().requires_grad_(True)
    xa = dsa(x, seed) if seed is not None else x
    ce = F.cross_entropy(fm(theta, xa), y)
    (g,) = torch.autograd.grad(ce, theta, create_graph=True)
    loss = ((theta - a * g - target) ** 2).sum()
    return loss, x, a


def measure(width: int, ipc: int, seed: int | None) -> dict:
    torch.manual_seed(0)
    spec = ModelSpec("convnet", 1, (28, 28), 10, width=width, depth=3)
    fm = FlatModel(build_model(spec))
    theta0 = fm.flatten()
    target = theta0 + 0.01 * torch.randn_like(theta0)
    x = torch.randn(10 * ipc, 1, 28, 28)
    y = torch.arange(10).repeat_interleave(ipc)
    alpha = torch.tensor(0.01)

    # Saved tensors: every pack during forward + inner grad is what the outer backward keeps.
    saved: dict[int, int] = {}

    def pack(t):
        if t.numel():
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, xg, ag = one_step(fm, x, y, theta0, alpha, target, seed)
    kinds = graph_nodes(loss.grad_fn)
    torch.autograd.grad(loss, [xg, ag])  # warm-up of the outer backward before profiling

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss, xg, ag = one_step(fm, x, y, theta0, alpha, target, seed)
    inner = aten_ops(prof)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.autograd.grad(loss, [xg, ag])
    outer = aten_ops(prof)
    aten = inner[0] + outer[0]
    norm_nodes = sum(v for k, v in kinds.items() if "Norm" in k or "norm" in k)
    return {
        "dsa": seed is not None,
        "width": width,
        "ipc": ipc,
        "images": len(y),
        "graph_nodes": sum(kinds.values()),
        "graph_nodes_norm": norm_nodes,
        "graph_node_kinds": dict(kinds.most_common()),
        "aten_ops": sum(aten.values()),
        "aten_ops_unroll": sum(inner[0].values()),
        "aten_ops_outer_backward": sum(outer[0].values()),
        "compute_ops": sum(inner[1].values()) + sum(outer[1].values()),
        "compute_ops_unroll": sum(inner[1].values()),
        "compute_ops_outer_backward": sum(outer[1].values()),
        "aten_top": dict(aten.most_common(15)),
        "saved_tensors": len(saved),
        "saved_bytes": sum(saved.values()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(args.width, args.ipc, seed) for seed in (None, 12345)]
    print(f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print("| DSA | graph nodes | aten ops (unroll + outer) | compute ops (unroll + outer) | saved tensors | saved MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['dsa'] else 'off'} | {r['graph_nodes']} | {r['aten_ops']} ({r['aten_ops_unroll']} + "
              f"{r['aten_ops_outer_backward']}) | {r['compute_ops']} ({r['compute_ops_unroll']} + {r['compute_ops_outer_backward']}) | "
              f"{r['saved_tensors']} | {r['saved_bytes'] / 2**20:.1f} |")
    for r in rows:
        print(f"\nDSA {'on' if r['dsa'] else 'off'}, node kinds: {r['graph_node_kinds']}")
        print(f"top aten ops: {r['aten_top']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
