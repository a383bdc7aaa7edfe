"""Why does ``dpd evaluate`` read lower than MTT's own evaluation? One difference at a time.

Trains fresh networks on synthetic sets under several evaluation loops and reports each loop's mean
test accuracy and its paired difference from dpd 0.1.0's loop (arm ``dpd``), with 95 % intervals.
Network ``i`` starts from the seed ``dpd evaluate --seed i`` gives its first network, in every arm.

* ``reference``: MTT's ``evaluate_synset`` re-created from reading the public code (not copied): a
  shuffled ``DataLoader``, batch 256, SGD (momentum 0.9, weight decay 5e-4), ``E + 1`` epochs, a new
  optimiser at lr x 0.1 after epoch ``E // 2 + 1``, MTT's ``DiffAugment``, torch's global generator.
* the knob arms: dpd's random streams, with five switches (``epochs``, ``decay``, ``restart``,
  ``dsa``, ``loader``) each at dpd 0.1.0's or MTT's value; ``+schedule`` is the current engine's loop.
* ``engine``: ``dpd_cli.recipes.evaluate`` as checked out, one network on a copy of the set.

The commands and the numbers: docs/results.md, "Evaluation loop: dpd vs MTT's evaluate_synset".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dpd_cli.artifacts.layout import SYNTHETIC
from dpd_cli.artifacts.synthetic import load as load_synthetic
from dpd_cli.artifacts.synthetic import save_synthetic
from dpd_cli.config.settings import EvalSettings
from dpd_cli.core.augment import OPS, dsa
from dpd_cli.core.train import accuracy
from dpd_cli.data import Preprocess, load_dataset
from dpd_cli.models import ModelSpec, build_model, default_depth
from dpd_cli.recipes import evaluate
from dpd_cli.recipes.runtime import build_preprocess, derive_seed
from dpd_cli.stats import paired

MOMENTUM, WEIGHT_DECAY, BATCH = 0.9, 5e-4, 256
MTT_EVAL = {"batch": BATCH, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "protocol": "mtt"}
DPD = {"epochs": "dpd", "decay": "dpd", "restart": False, "dsa": "dpd", "loader": "dpd"}
MTT = {"epochs": "mtt", "decay": "mtt", "restart": True, "dsa": "mtt", "loader": "mtt"}

# Arm name -> knob overrides on top of dpd's loop ("reference" and "engine" are separate loops).
ARMS = {
    "dpd": {},
    "+epochs": {"epochs": "mtt"},
    "+decay": {"decay": "mtt"},
    "+restart": {"restart": True},
    "+schedule": {"epochs": "mtt", "decay": "mtt", "restart": True},
    "+dsa": {"dsa": "mtt"},
    "+loader": {"loader": "mtt"},
    "all-mtt": dict(MTT),
    "reference": None,
    "engine": None,
}


# ---------------------------------------------------------------- MTT's DiffAugment, re-created
# One family per call, drawn uniformly from six; parameters drawn per image. Every draw comes
# from ``g`` in the order MTT makes them (the reference passes torch's global generator).
def _u(n, g, x):
    return torch.rand(n, 1, 1, 1, generator=g, dtype=x.dtype).to(x.device)


def _mtt_color(x, g):
    n = x.shape[0]
    x = x + (_u(n, g, x) - 0.5) * 1.0  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_u(n, g, x) * 2.0) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_u(n, g, x) + 0.5) + mean  # contrast


def _mtt_crop(x, g):
    n, _, h, w = x.shape
    sx, sy = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
    tx = torch.randint(-sx, sx + 1, (n, 1, 1), generator=g).to(x.device)
    ty = torch.randint(-sy, sy + 1, (n, 1, 1), generator=g).to(x.device)
    b = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
    r = (torch.arange(h, device=x.device).view(1, h, 1) + tx + 1).clamp(0, h + 1).expand(n, h, w)
    c = (torch.arange(w, device=x.device).view(1, 1, w) + ty + 1).clamp(0, w + 1).expand(n, h, w)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    return padded[b, r, c].permute(0, 3, 1, 2)


def _mtt_cutout(x, g):
    n, _, h, w = x.shape
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), generator=g).to(x.device)
    oy = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), generator=g).to(x.device)
    # A ch x cw block of indices around the offset, clamped into the image, set to zero.
    r = (torch.arange(ch, device=x.device).view(1, ch, 1) + ox - ch // 2).clamp(0, h - 1).expand(n, ch, cw)
    c = (torch.arange(cw, device=x.device).view(1, 1, cw) + oy - cw // 2).clamp(0, w - 1).expand(n, ch, cw)
    b = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, ch, cw)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[b, r, c] = 0
    return x * mask.unsqueeze(1)


def _mtt_flip(x, g):
    return torch.where(_u(x.shape[0], g, x) < 0.5, x.flip(3), x)


def _mtt_grid(x, theta):
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _mtt_scale(x, g):
    n = x.shape[0]
    lo, hi = 1 / 1.2, 1.2
    sx = torch.rand(n, generator=g) * (hi - lo) + lo
    sy = torch.rand(n, generator=g) * (hi - lo) + lo
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    return _mtt_grid(x, theta)


def _mtt_rotate(x, g):
    n = x.shape[0]
    a = (torch.rand(n, generator=g) - 0.5) * 2 * 15.0 / 180 * math.pi
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), -torch.sin(a)  # MTT writes sin(-a)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
    return _mtt_grid(x, theta)


_MTT_FAMILIES = [_mtt_color, _mtt_crop, _mtt_cutout, _mtt_flip, _mtt_scale, _mtt_rotate]


def mtt_diffaugment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """MTT's ``DiffAugment(x, 'color_crop_cutout_flip_scale_rotate', param=ParamDiffAug())`` (CPU draws)."""
    family = _MTT_FAMILIES[int(torch.randint(0, len(_MTT_FAMILIES), (1,), generator=g))]
    return family(x, g).contiguous()


# ---------------------------------------------------------------- the loops
def net_seed(spec: ModelSpec, net: int) -> int:
    """Network ``net``'s seed: what ``dpd evaluate --seed net`` gives its first network of this model."""
    return derive_seed(net, "distilled", spec.name, 0)


def _new_net(spec: ModelSpec, seed: int, device) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(spec).to(device)


def reference_loop(spec, x, y, x_test, y_test, lr, epochs, seed, device) -> float:
    """MTT's evaluate_synset as distill.py calls it (see the module docstring)."""
    net = _new_net(spec, seed, device)  # leaves the global generator at a seed-determined state
    gen = torch.default_generator
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    loader = DataLoader(TensorDataset(x.detach().float(), y.detach()), batch_size=BATCH, shuffle=True, num_workers=0)
    acc = None
    for ep in range(epochs + 1):
        net.train()
        for img, lab in loader:
            img = mtt_diffaugment(img.float().to(device), gen)
            loss = F.cross_entropy(net(img), lab.long().to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep == epochs:
            acc = accuracy(net, x_test, y_test)
        if ep == epochs // 2 + 1:
            lr *= 0.1
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    return acc


def knob_loop(spec, x, y, x_test, y_test, lr, epochs, seed, device, knobs: dict) -> float:
    """dpd's random streams, with each protocol difference switchable (see the module docstring)."""
    k = {**DPD, **knobs}
    net = _new_net(spec, seed, device)
    make_opt = lambda lr_: torch.optim.SGD(net.parameters(), lr=lr_, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)  # noqa: E731
    opt = make_opt(lr)
    n_epochs = epochs + 1 if k["epochs"] == "mtt" else epochs
    decay_after = epochs // 2 + 2 if k["decay"] == "mtt" else epochs // 2  # epochs completed at full lr
    sched = None if k["restart"] else torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[decay_after], gamma=0.1)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    loader = None
    if k["loader"] == "mtt":
        loader = DataLoader(
            TensorDataset(x, y), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
    for done in range(1, n_epochs + 1):
        net.train()
        if loader is None:
            order = torch.randperm(x.shape[0], generator=gen).to(x.device)
            batches = ((x[order[i : i + BATCH]], y[order[i : i + BATCH]]) for i in range(0, x.shape[0], BATCH))
        else:
            batches = iter(loader)
        for xb, yb in batches:
            s = rng.getrandbits(63)
            xb = dsa(xb, s) if k["dsa"] == "dpd" else mtt_diffaugment(xb, torch.Generator().manual_seed(s))
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
        elif done == decay_after:
            opt = make_opt(lr * 0.1)
    return accuracy(net, x_test, y_test)


def engine_loop(file: str, net: int, lr: float, epochs: int, device) -> float:
    """``dpd evaluate FILE --seed net --runs 1 --epochs E --lr lr`` at MTT's batch, momentum and weight decay, on a copy."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / SYNTHETIC
        shutil.copy(file, copy)
        run = {"seed": net, "runs": 1, "epochs": epochs, "lr": lr, "device": str(device), "dsa": True}
        s = EvalSettings(**run, **MTT_EVAL, threads=torch.get_num_threads())
        return evaluate.run(s, copy)["results"][-1]["accuracies"][0]


def run_arm(arm: str, st: dict, net: int, epochs: int, device) -> float:
    if arm == "engine":
        return engine_loop(st["file"], net, st["lr"], epochs, device)
    data = [st[k] for k in ("spec", "x", "y", "x_test", "y_test", "lr")]
    args = (*data, epochs, net_seed(st["spec"], net), device)
    return reference_loop(*args) if arm == "reference" else knob_loop(*args, ARMS[arm])


# ---------------------------------------------------------------- data and statistics
def load_set(target: str, device):
    p = Path(target)
    file = p / SYNTHETIC if p.is_dir() else p
    tensors, meta = load_synthetic(file)
    ds = load_dataset(meta["dataset"], None)
    pre = Preprocess.from_tensors(tensors)
    spec = ModelSpec.from_dict(meta["model"])
    return {
        "file": str(file),
        "spec": spec,
        "lr": float(tensors["lr"]),
        "ipc": int(meta.get("ipc") or 0),
        "x": tensors["images"].to(device),
        "y": tensors["labels"].to(device),
        "x_test": pre.apply(ds.test_images).to(device),
        "y_test": ds.test_labels.to(device),
    }


def summarise(records: list[dict], arms: list[str], base: str = "dpd") -> list[dict]:
    """Per arm: mean accuracy, std over networks, paired difference from ``base`` with its 95% CI."""
    rows = []
    by = {(r["set"], r["net"], r["arm"]): r["acc"] for r in records}
    for arm in arms:
        accs = [r["acc"] * 100 for r in records if r["arm"] == arm]
        pairs = [
            (by[k[0], k[1], arm] - by[k[0], k[1], base]) * 100 for k in by if k[2] == base and (k[0], k[1], arm) in by
        ]
        d = paired(pairs) if pairs else {"mean": math.nan, "half_width": None}
        rows.append(
            {
                "arm": arm,
                "n": len(accs),
                "mean": statistics.fmean(accs) if accs else float("nan"),
                "std": statistics.pstdev(accs) if len(accs) > 1 else float("nan"),
                "diff": d["mean"],
                "ci": math.nan if d["half_width"] is None else d["half_width"],
                "pairs": len(pairs),
            }
        )
    return rows


def markdown(rows: list[dict], title: str, base: str = "dpd") -> str:
    out = [
        f"#### {title}",
        "",
        f"| arm | networks | mean % | std | paired diff vs {base} (95% CI) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        diff = "—" if r["arm"] == base or not r["pairs"] else f"{r['diff']:+.2f} ± {r['ci']:.2f}"
        out.append(f"| {r['arm']} | {r['n']} | {r['mean']:.2f} | {r['std']:.2f} | {diff} |")
    return "\n".join(out)


def smoke_set(folder: Path) -> str:
    """A synthetic file of one real image per class of the embedded set (width-8 ConvNet, lr 0.01)."""
    ds = load_dataset("fashion-mnist-mini", None)
    pre = build_preprocess(ds, zca=False)
    c, h, w = ds.image_shape
    spec = ModelSpec("convnet", c, (h, w), ds.n_classes, 8, default_depth((h, w)))
    idx = evaluate.random_subset(ds.train_labels, ds.n_classes, 1, 0)
    file = folder / SYNTHETIC
    save_synthetic(
        file,
        pre.apply(ds.train_images[idx]),
        ds.train_labels[idx],
        torch.tensor(0.01),
        pre,
        {"model": spec.to_dict(), "classes": list(ds.classes), "dataset": ds.name, "ipc": 1},
    )
    return str(file)


# ---------------------------------------------------------------- main
def check(sets, epochs: int, device, arm: str) -> bool:
    """Does knob arm ``arm`` give the engine's accuracy, network for network?"""
    ok = True
    for st in sets:
        for net in range(3):
            a, b = run_arm(arm, st, net, epochs, device), run_arm("engine", st, net, epochs, device)
            print(f"{st['file']} network {net}: {arm} {a:.4f} engine {b:.4f}", flush=True)
            ok &= a == b
    return ok


def check_dsa(x: torch.Tensor, n: int = 20000) -> dict:
    """Per family, KS p-values of five features of dpd's ``dsa`` and the MTT re-creation on ``x[0]``, ``n`` draws."""
    from scipy.stats import ks_2samp  # optional: only --check-dsa needs scipy

    img = x[:1].cpu().double()
    reps = img.expand(n, *img.shape[1:]).contiguous()
    flat_in, flat_flip = img.flatten(1), img.flip(3).flatten(1)

    def features(out):
        f = out.flatten(1)
        cen = lambda t: t - t.mean(1, keepdim=True)  # noqa: E731
        corr = (cen(f) * cen(flat_flip)).sum(1) / (cen(f).norm(dim=1) * cen(flat_flip).norm(dim=1)).clamp_min(1e-12)
        return {
            "mean": f.mean(1),
            "std": f.std(1),
            "zeros": (f == 0).double().mean(1),
            "dist": (f - flat_in).norm(dim=1),
            "corr_flipped": corr,
        }

    fams = dict(zip(OPS, _MTT_FAMILIES))
    result = {}
    for op in OPS:
        ours = features(dsa(reps, 12345, ops=(op,)))
        theirs = features(fams[op](reps, torch.Generator().manual_seed(54321)))
        result[op] = {k: float(ks_2samp(ours[k].numpy(), theirs[k].numpy()).pvalue) for k in ours}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", help="run directories or synthetic.safetensors files")
    ap.add_argument("--nets", type=int, default=40, help="networks per arm and set")
    ap.add_argument("--epochs", type=int, default=300, help="E: dpd trains E epochs, MTT E + 1")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    ap.add_argument("--lr", type=float, help="train at this lr instead of each set's learned one (a stress test)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--check", metavar="ARM", help="only: does knob arm ARM give the engine's accuracies?")
    ap.add_argument("--check-dsa", action="store_true", help="only: dpd's DSA against the MTT re-creation")
    ap.add_argument("--out", help="JSON file; existing records in it are kept and reused")
    ap.add_argument("--smoke", action="store_true", help="every arm, 1 network, 1 epoch, then --check +schedule")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if a.smoke:
        a.targets, a.nets, a.epochs = [smoke_set(Path(tempfile.mkdtemp(prefix="eval-protocol-smoke-")))], 1, 1
    if not a.targets:
        ap.error("give at least one run directory or synthetic file (or --smoke)")
    sets = [load_set(t, device) for t in a.targets]
    if a.lr is not None:
        for st in sets:
            st["lr"] = a.lr
    if a.check or a.smoke:
        ok = check(sets, min(a.epochs, 30), device, a.check or "+schedule")
        print("identical" if ok else "DIFFERENT")
        if not a.smoke or not ok:
            return 0 if ok else 1
    if a.check_dsa:
        # The set's first image, and a seeded random colour image (grey images hide saturation).
        rgb = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        for name, img in [(st["file"], st["x"]) for st in sets] + [("random 3x32x32 image", rgb)]:
            res = check_dsa(img)
            print(f"{name}: two-sample KS p-values, dpd dsa vs MTT DiffAugment, one image x 20,000 draws")
            print("| family | " + " | ".join(next(iter(res.values()))) + " |")
            print("|---" * (1 + len(next(iter(res.values())))) + "|")
            for op, ps in res.items():
                print(f"| {op} | " + " | ".join(f"{v:.3f}" for v in ps.values()) + " |")
        return 0
    arms = [s.strip() for s in a.arms.split(",") if s.strip()]
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    out = Path(a.out) if a.out else None
    data = json.loads(out.read_text()) if out and out.exists() else {"records": []}
    have = {(r["set"], r["net"], r["arm"], r["epochs"], r["lr"]) for r in data["records"]}
    load = os.getloadavg()[0]
    t_start = time.time()
    for net in range(a.nets):
        for st in sets:
            for arm in arms:
                if (st["file"], net, arm, a.epochs, st["lr"]) in have:
                    continue
                t0 = time.perf_counter()
                acc = run_arm(arm, st, net, a.epochs, device)
                rec = {"set": st["file"], "net": net, "arm": arm, "epochs": a.epochs, "acc": acc, "lr": st["lr"]}
                data["records"].append({**rec, "ipc": st["ipc"], "seconds": time.perf_counter() - t0})
            print(f"net {net}: {time.time() - t_start:.0f} s", file=sys.stderr, flush=True)
            if out:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(data))
    wanted = {(s["file"], s["lr"]) for s in sets}
    records = [
        r for r in data["records"] if r["epochs"] == a.epochs and (r["set"], r["lr"]) in wanted and r["arm"] in arms
    ]
    print(f"load average at start {load:.2f}, torch {torch.__version__}, {a.threads} thread(s), E = {a.epochs}\n")
    for st in sets:
        rows = summarise([r for r in records if r["set"] == st["file"]], arms)
        what = "lr" if a.lr is not None else "learned lr"
        print(markdown(rows, f"{st['file']} (IPC {st['ipc']}, {what} {st['lr']:.5f})") + "\n")
    if len(sets) > 1:
        print(markdown(summarise(records, arms), f"all {len(sets)} sets pooled") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
