#!/usr/bin/env python3
r"""Peak memory of recording and saving one expert trajectory: this checkout against another.

    git worktree add /tmp/dpd-before <commit>          # or: git archive <commit> | tar -x -C /tmp/dpd-before
    python benchmarks/trajectory_memory.py --before /tmp/dpd-before --epochs 20 --reps 2

Each measurement is a fresh subprocess that imports ``dpd_cli`` from one source tree and runs that
tree's own ``engine.experts._train_one`` for a ResNet-18 (11.2 M parameters, 3x32x32 images, 10
classes) on 8 images, with ``train_epoch`` replaced by an in-place nudge of the parameters and
``accuracy`` by a constant: what remains is exactly the recording of the (E+1, P) trajectory and
``storage.save_tensors``. The number reported is ``ru_maxrss`` after the call minus ``ru_maxrss``
just before it (the model, data and imports are in both; the imports' own peak is ~40 MiB above
the resident size at that point, so small growths read slightly low), in MiB and in trajectory copies
((E+1) x P x 4 bytes). Sides are interleaved (before, after, before, after, ...); medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, tempfile
from pathlib import Path
import torch
import dpd_cli.recipes.experts as E
from dpd_cli.data import Preprocess
from dpd_cli.events import NullSink
from dpd_cli.models import FlatModel, ModelSpec, build_model
from dpd_cli.config.settings import ExpertSettings

epochs, out = int(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(1)
spec = ModelSpec("resnet18", 3, (32, 32), 10, norm="instance")
settings = ExpertSettings(epochs=epochs, model="resnet18", threads=1, device="cpu")
pre = Preprocess(torch.zeros(3), torch.ones(3))
x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10


def nudge(net, *a, **k):  # stands in for an epoch of training: parameters change in place
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1e-3)
    return torch.tensor(1.0), torch.tensor(1)


E.train_epoch = nudge
E.accuracy = lambda *a, **k: 0.1
n_params = FlatModel(build_model(spec)).n_params
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
E._train_one(0, settings, spec, pre, out, x, y, x, y, torch.device("cpu"), NullSink())
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert Path(E.__file__).is_relative_to(sys.argv[3]), E.__file__
print(json.dumps({"n_params": n_params, "extra_kib": after - before, "file_bytes": (out / "expert_00000.safetensors").stat().st_size}))
"""


def measure(tree: Path, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        # cwd: not a source tree (``python -c`` puts the working folder first on sys.path)
        r = subprocess.run([sys.executable, "-c", CHILD, str(epochs), out, str(tree.resolve())], cwd=out, env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="source tree of the version to compare with")
    ap.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1], help="default: this checkout")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    extra: dict[str, list[float]] = {"before": [], "after": []}
    n_params = 0
    for _ in range(args.reps):
        for side in ("before", "after"):
            m = measure(getattr(args, side), args.epochs)
            n_params = m["n_params"]
            extra[side].append(m["extra_kib"] / 1024)
    copy_mib = (args.epochs + 1) * n_params * 4 / 2**20
    print(f"ResNet-18, P = {n_params:,}, E = {args.epochs}: one trajectory copy = {copy_mib:.0f} MiB; load {os.getloadavg()[0]:.2f}")
    print("| side | peak RSS growth, MiB (median of %d) | in trajectory copies | runs |" % args.reps)
    print("|---|---|---|---|")
    for side, values in extra.items():
        med = statistics.median(values)
        print(f"| {side} | {med:.0f} | {med / copy_mib:.2f} | {', '.join(f'{v:.0f}' for v in values)} |")
    print(f"ratio after/before: {statistics.median(extra['after']) / statistics.median(extra['before']):.2f}")


if __name__ == "__main__":
    main()
