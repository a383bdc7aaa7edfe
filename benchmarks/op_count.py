#!/usr/bin/env python3
r"""Size of one distillation student step's autograd graph: nodes, aten ops, saved tensors.

    python benchmarks/op_count.py                    # ConvNet-128, 28x28 grey, IPC 10, DSA off and on
    python benchmarks/op_count.py --json out.json

Two students are counted: ``group_norm``, the ConvNet's ``forward_flat`` as it was before
``dpd_cli.models.norm`` (``F.group_norm``, ``F.relu``, ``F.avg_pool2d``; PyTorch's own
derivatives), and ``fused``, today's ``forward_flat``.

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
import sys

import torch
import torch.nn.functional as F

from dpd_cli.core.augment import dsa
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
    """(every aten call, the outermost aten calls that compute).

    "Outermost": called from Python or by the autograd engine, not from inside another aten op
    (``einsum``'s ``bmm`` counts as the ``einsum``); views and allocations are left out. Each such
    call launches one or more kernels on a GPU, so this approximates the launches per step.
    """
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    every = collections.Counter(e.name for e in events)

    def outermost(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return False
            p = p.cpu_parent
        return True

    top = collections.Counter(e.name for e in events if e.name not in _NO_COMPUTE and outermost(e))
    return every, top


def group_norm_student(net):
    """``ConvNet.forward_flat`` before the fused norm: the same layers in plain functional ops."""

    def forward(p, x):
        for d in range(1, net.depth + 1):
            x = F.conv2d(x, p[f"conv{d}.weight"], p[f"conv{d}.bias"], padding=net._pads[d - 1])
            x = F.group_norm(x, net._width, p[f"norm{d}.weight"], p[f"norm{d}.bias"], eps=1e-5)
            x = F.avg_pool2d(F.relu(x), 2, 2)
        return F.linear(x.flatten(1), p["fc.weight"], p["fc.bias"])

    return forward


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


def measure(width: int, ipc: int, seed: int | None, student: str) -> dict:
    torch.manual_seed(0)
    spec = ModelSpec("convnet", 1, (28, 28), 10, width=width, depth=3)
    fm = FlatModel(build_model(spec))
    if student == "group_norm":
        fm.module.forward_flat = group_norm_student(fm.module)
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
    return {
        "student": student,
        "dsa": seed is not None,
        "width": width,
        "ipc": ipc,
        "images": len(y),
        "graph_nodes": sum(kinds.values()),
        "graph_node_kinds": dict(kinds.most_common()),
        "aten_ops": sum(aten.values()),
        "aten_ops_unroll": sum(inner[0].values()),
        "aten_ops_outer_backward": sum(outer[0].values()),
        "compute_ops": sum(inner[1].values()) + sum(outer[1].values()),
        "compute_ops_unroll": sum(inner[1].values()),
        "compute_ops_outer_backward": sum(outer[1].values()),
        "compute_top": dict((inner[1] + outer[1]).most_common()),
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
    rows = [measure(args.width, args.ipc, seed, student) for seed in (None, 12345) for student in ("group_norm", "fused")]
    print(f"torch {torch.__version__}, ConvNet-{args.width} depth 3, 28x28x1, {10 * args.ipc} images, one student step "
          "(forward + grad with create_graph) and the outer backward through it")
    print("| student | DSA | graph nodes | aten calls (unroll + outer) | compute calls (unroll + outer) | saved tensors | saved MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['student']} | {'on' if r['dsa'] else 'off'} | {r['graph_nodes']} | {r['aten_ops']} ({r['aten_ops_unroll']} + "
              f"{r['aten_ops_outer_backward']}) | {r['compute_ops']} ({r['compute_ops_unroll']} + {r['compute_ops_outer_backward']}) | "
              f"{r['saved_tensors']} | {r['saved_bytes'] / 2**20:.1f} |")
    for r in rows:
        print(f"\n{r['student']}, DSA {'on' if r['dsa'] else 'off'}: node kinds {r['graph_node_kinds']}")
        print(f"compute calls: {r['compute_top']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
