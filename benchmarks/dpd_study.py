r"""Does DPD beat MTT? Paired studies over seeds with `dpd study`, and 95 % confidence intervals of the differences.

Per (dataset, IPC) cell the script writes `dpd study` configs into ``<out>/<dataset>/ipc<IPC>/`` and runs
them: per dataset the experts are trained once (with a validation split) into ``<out>/<dataset>/experts``;
per seed MTT (rho 0) and every pruning variant share them, the initial images, every per-iteration draw
and the evaluation seeds; each run (``<out>/<dataset>/ipc<IPC>/<variant>/s<seed>``) is evaluated with
``--select val``. A variant ``...@lrS`` of the robust plan is compared with ``mtt@lrS`` (one study per lr_img
scale, the scales in the order run); a run that diverges is recorded as such. The report pools every cell's
``records.jsonl`` (and ``<out>/records.jsonl`` of the earlier script). Resumable; ``--workers W`` runs W runs
at a time (torchrun ranks of one torch thread each). The commands and numbers: docs/results.md.

``--plan scale``: MTT's CIFAR-10 IPC 10 on one GPU (``--cifar10-dir``: the CIFAR-10 JPEG copy, a folder with
train/ and test/ or its .tar.gz), ConvNet-128 with ZCA, the hyper-parameters of examples/cifar10-ipc10.toml,
MTT (rho 0) against dpd's default (rho 0.01, abs, largest) over 3 seeds; results.md puts MTT's published
65.3 ± 0.7 % beside the table. GPU time from the H200 figures of docs/results.md, one process:

    experts   20 × 30 epochs × 49,500 images at ~66,000 images/s        ~450 s  (+ JPEG decode, ZCA: ~30 s)
    distill   2 variants × 3 seeds × 1,000 iterations × 0.133 s/it       ~800 s  (+ ~10 s per run to start)
    evaluate  6 runs × 5 checkpoints (every 250) × 2 networks × ~3 s     ~180 s

about 24 minutes one network and one run at a time. dpd batches all three on a GPU (experts 4 at once,
evaluation networks 8, the plan's 6 distillations as one batch: ``[study] concurrent = 8``); at the speed-ups
that gpu_check.sh's batched step asks for (experts 4x, evaluation 5x, distillations 4x) these minimum sizes
would take about 115 + 30 + 200 + 40 s plus ~90 s of start-up, 8 minutes -- an estimate, not measured.
``gpu_check.sh --scale`` therefore runs sizes that fit 9 minutes without those speed-ups, ``--experts 10
--expert-epochs 24 --iterations 250 --eval-runs 1`` (about 180 + 200 + 40 s plus start-up one at a time), and
``SCALE_ARGS=''`` the minimum sizes. Several processes on one GPU do not help (two torchrun ranks: 0.414 s/it
against 0.229 for one process).

    python benchmarks/dpd_study.py --plan robust --fashion-mnist-dir data/fashion-mnist --out bench-out/dpd-robust
    python benchmarks/dpd_study.py --plan scale --cifar10-dir data/cifar10-jpeg.tar.gz --out bench-out/dpd-scale
    python benchmarks/dpd_study.py --report-only --out bench-out/dpd-study --figures docs/figures/dpd-study
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from dpd_cli.config.settings import dump_toml
from dpd_cli.recipes import study

ROOT = Path(__file__).resolve().parents[1]

#: The datasets: a preset each (network, experts, evaluation), the study adds a validation split.
DATASETS = {
    "fashion-mnist": {"preset": ROOT / "examples" / "fashion-mnist-cpu.toml", "lr_img": 1000.0},
    "cifar10": {"preset": ROOT / "examples" / "cifar10-jpeg-cpu.toml", "lr_img": 100.0},
    # The embedded set (no folder needed): --dataset fashion-mnist-mini, and --smoke.
    "fashion-mnist-mini": {"preset": ROOT / "examples" / "quick.toml", "lr_img": 1000.0},
    # MTT's settings (--plan scale) on the CIFAR-10 JPEG copy.
    "cifar10-mtt": {
        "preset": ROOT / "examples" / "cifar10-ipc10.toml",
        "lr_img": 100.0,
        "top": {"dataset": "imagefolder"},
    },
}
DIR_OF = {"fashion-mnist": "fashion_mnist_dir", "cifar10": "cifar10_dir", "cifar10-mtt": "cifar10_dir"}
#: Distillation per IPC: N student steps, alpha_0, mini-batch (IPC 50 walks 100 of its 500 images per step).
IPC = {
    1: {"syn_steps": 20, "lr_teacher": 0.01},
    10: {"syn_steps": 10, "lr_teacher": 0.03},
    50: {"syn_steps": 10, "lr_teacher": 0.03, "batch_syn": 100},
}
VAL_PER_CLASS = 50
PUBLISHED = "MTT as published (Cazenavette et al. 2022, CIFAR-10 IPC 10, 5,000 iterations, 100 experts): 65.3 ± 0.7 %"

#: Every variant: the distill settings that differ from MTT's.
VARIANTS = {
    "mtt": {"prune_ratio": 0.0},
    # DPD's reading (and dpd's default at 0.01): prune the largest residuals from the loss.
    "abs-largest-0.01": {"prune_ratio": 0.01},
    "abs-largest-0.05": {"prune_ratio": 0.05},
    "abs-largest-0.1": {"prune_ratio": 0.1},
    # PAD's direction: drop the smallest (best-aligned) residuals, at its ratios.
    "abs-smallest-0.01": {"prune_ratio": 0.01, "prune_direction": "smallest"},
    "abs-smallest-0.05": {"prune_ratio": 0.05, "prune_direction": "smallest"},
    "abs-smallest-0.25": {"prune_ratio": 0.25, "prune_direction": "smallest"},
    "abs-smallest-0.5": {"prune_ratio": 0.5, "prune_direction": "smallest"},
    # Scale-free criteria.
    "relative-largest-0.05": {"prune_ratio": 0.05, "prune_criterion": "relative"},
    "layer-z-largest-0.05": {"prune_ratio": 0.05, "prune_criterion": "layer-z"},
    "layer-rank-largest-0.05": {"prune_ratio": 0.05, "prune_criterion": "layer-rank"},
    # Stable masks, and pruning from the network itself.
    "layer-z-largest-0.05-ema": {"prune_ratio": 0.05, "prune_criterion": "layer-z", "prune_mask": "ema"},
    "abs-largest-0.05-network": {"prune_ratio": 0.05, "prune_mode": "network", "prune_mask": "ema"},
    # Soft labels (DATM), against MTT's hard labels.
    "mtt-soft": {"prune_ratio": 0.0, "soft_labels": True},
}
_PAPER_VARIANTS = list(VARIANTS)
#: The robust plan: MTT and two DPD ratios, each at lr_img x scale ("NAME@lrS"); the scales in the order run.
LR_SCALES = [1, 10, 3, 0.3, 0.1]
_ROBUST = ["mtt", "abs-largest-0.01", "abs-largest-0.05"]
# Simpler guards on the step than DPD: the step ramped up from a tenth over the first 10 of the 100 iterations, or
# the image gradient clipped at 0.0033 (Fashion-MNIST: the median grad_norm of MTT's first 25 iterations at x10).
VARIANTS |= {
    "mtt-warmup": {"prune_ratio": 0.0, "lr_img_warmup": 10},
    "mtt-clip": {"prune_ratio": 0.0, "clip_img": 0.0033},
}
_REMEDIES = ["mtt-warmup", "mtt-clip"]
VARIANTS.update({f"{v}@lr{sc:g}": {**VARIANTS[v], "lr_img_scale": sc} for sc in LR_SCALES for v in _ROBUST + _REMEDIES})


def baseline(variant: str) -> str:
    """The MTT run a variant is paired with: MTT at the same lr_img scale."""
    return "mtt" + variant[variant.index("@") :] if "@" in variant else "mtt"


#: Which variants run in which (dataset, IPC) cell, on which seeds, and at what length: ``cpu`` fits a
#: 2-core machine in an afternoon, ``full`` is the whole grid, ``scale`` MTT's CIFAR-10 on a GPU. Checkpoints
#: every ``checkpoint_every`` iterations (0 included) are the candidates of ``--select val``.
_MAIN = ["mtt", "abs-largest-0.01", "abs-smallest-0.25", "layer-z-largest-0.05", "mtt-soft"]
_SMOKE = {"seeds": [0, 1], "iterations": 2, "checkpoint_every": 1, "runs": 1, "eval_epochs": 1}
_SMOKE |= {"overrides": {"max_start_epoch": 1, "expert_epochs": 1, "syn_steps": 2, "width": 8, "train_per_class": 20}}
_SMOKE |= {"experts": {"num": 1, "epochs": 2, "width": 8, "train_per_class": 20}}
PLANS = {
    "cpu": {
        "seeds": [0, 1, 2, 3, 4],
        "cells": {
            ("cifar10", 10): _MAIN,
            ("fashion-mnist", 10): ["mtt", "abs-largest-0.01", "abs-smallest-0.25", "mtt-soft"],
            ("fashion-mnist", 1): ["mtt", "abs-largest-0.01", "abs-smallest-0.25"],
            ("cifar10", 1): ["mtt", "abs-largest-0.01", "abs-smallest-0.25"],
        },
        **{"iterations": 150, "checkpoint_every": 50, "runs": 2, "eval_epochs": 300},
    },
    "full": {
        "seeds": [0, 1, 2, 3, 4],
        "cells": {(d, i): (_PAPER_VARIANTS if i == 10 else _MAIN) for d in list(DATASETS)[:3] for i in (10, 1, 50)},
        **{"iterations": 300, "checkpoint_every": 100, "runs": 3, "eval_epochs": 300},
    },
    "robust": {
        "seeds": [0, 1, 2, 3, 4],
        "cells": {
            (d, 10): [f"{v}@lr{sc:g}" for sc in LR_SCALES for v in _ROBUST]
            + ([f"{v}@lr10" for v in _REMEDIES] if d == "fashion-mnist" else [])
            for d in list(DATASETS)[:3]
        },
        **{"iterations": 100, "checkpoint_every": 25, "runs": 2, "eval_epochs": 300},
    },
    "scale": {  # the budget: the module docstring; MTT's own N, alpha_0 and lr_img (no IPC table)
        "seeds": [0, 1, 2],
        "cells": {("cifar10-mtt", 10): ["mtt", "abs-largest-0.01"]},
        **{"iterations": 1000, "checkpoint_every": 250, "runs": 2, "eval_epochs": 1000, "mtt_settings": True},
        "experts": {"num": 20, "epochs": 30},
        "concurrent": 8,  # the 6 runs as one batch on the GPU
    },
    # the pipeline at toy size: seconds on the embedded set (--smoke)
    "smoke": {**_SMOKE, "cells": {("fashion-mnist", 1): ["mtt", "abs-largest-0.05@lr1", "mtt@lr1"]}},
}


def _variant(name: str, lr_img: float) -> dict:
    v = dict(VARIANTS[name])
    scale = v.pop("lr_img_scale", None)
    return v | ({"lr_img": lr_img * scale} if scale is not None else {})


def configs(plan: dict, out: Path, dirs: dict) -> list[Path]:
    """Write one `dpd study` config per (cell, MTT it is paired with); returned in the order to run: by lr_img
    scale (``LR_SCALES``), then as the plan lists the cells."""
    groups = [
        (d, ipc, b, [b, *(v for v in variants if baseline(v) == b and v != b)])
        for (d, ipc), variants in plan["cells"].items()
        for b in dict.fromkeys(map(baseline, variants))
    ]
    order = {f"mtt@lr{sc:g}": i for i, sc in enumerate(LR_SCALES)}
    paths = []
    for d, ipc, b, variants in sorted(groups, key=lambda g: order.get(g[2], 0)):
        preset, info = tomllib.loads(DATASETS[d]["preset"].read_text()), DATASETS[d]
        data = {"data_dir": str(dirs[d])} if dirs.get(d) else {}
        cell = out / d / f"ipc{ipc}"
        cfg = {
            **{k: v for k, v in preset.items() if not isinstance(v, dict)},
            **info.get("top", {}),
            **{"val_per_class": VAL_PER_CLASS, "threads": 1},
            "study": {
                **{"seeds": plan["seeds"], "baseline": b, "out": str(cell), "experts": str(out / d / "experts")},
                **({"concurrent": plan["concurrent"]} if "concurrent" in plan else {}),
                "variants": {v: _variant(v, info["lr_img"]) for v in variants},
            },
            "experts": {**preset.get("experts", {}), **data, **plan.get("experts", {})},
            "distill": {
                **preset.get("distill", {}),
                **data,
                **{"ipc": ipc, "iterations": plan["iterations"], "checkpoint_every": plan["checkpoint_every"]},
                **{"keep_checkpoints": "all", "lr_img": info["lr_img"], "log_every": 50},
                **({} if plan.get("mtt_settings") else IPC[ipc]),
                **plan.get("overrides", {}),
            },
            "evaluate": {**preset.get("evaluate", {}), "runs": plan["runs"], "epochs": plan["eval_epochs"]},
        }
        cell.mkdir(parents=True, exist_ok=True)
        path = cell / ("study.toml" if b == "mtt" else f"study-{b.partition('@')[2]}.toml")
        path.write_text(f"# dpd study {path}\n# written by benchmarks/dpd_study.py\n" + dump_toml(cfg))
        paths.append(path)
    return paths


def run_study(config: Path, workers: int) -> None:
    """``dpd study CONFIG`` in a fresh process, or ``workers`` torchrun ranks."""
    ranks = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}"] if workers > 1 else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, *ranks, "-m", "dpd_cli", "study", str(config)], check=True, env=env)


def image_folder(path: Path, out: Path) -> Path:
    """The folder with train/ and test/: ``path`` itself, its one subfolder, or a .tar.gz unpacked into ``out``."""
    if path.is_file():
        dest = out / "cifar10-jpeg"
        if not dest.is_dir():
            with tarfile.open(path) as tar:
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(dest.with_suffix(".part"), **safe)
            dest.with_suffix(".part").rename(dest)
        path = dest
    subs = [p for p in path.iterdir() if p.is_dir()] if not (path / "train").is_dir() else []
    return subs[0] if len(subs) == 1 else path


def collect(out: Path) -> list[dict]:
    """Every recorded run: ``<out>/records.jsonl`` (the earlier script's), then each cell's ``records.jsonl``."""
    found = {}
    for r in study.read_records(out):
        found[r["dataset"], r["ipc"], r["variant"], r["seed"]] = r
    for cell in sorted(p for p in out.glob("*/ipc*") if p.name[3:].isdigit()):
        for r in study.read_records(cell):
            r |= {"dataset": cell.parent.name, "ipc": int(cell.name[3:])}
            found[r["dataset"], r["ipc"], r["variant"], r["seed"]] = r
    return list(found.values())


def _fmt_ci(d: dict | None) -> str:
    if not d or d.get("ci") is None:
        return "–" if not d else f"{d['mean']:+.2f}"
    lo, hi = d["ci"]
    return f"{d['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]" + (" **" if lo > 0 or hi < 0 else "")


def _acc(m: dict | None) -> str:
    return "–" if not m else f"{m['mean']:.2f} ± {m['std']:.2f}"


def markdown(rows: list[dict], meta: dict, pools: list[dict] | None = None) -> str:
    out = [
        "Test accuracy % (mean ± sample std over seeds) of the validation-selected checkpoint, of the final set and of "
        "the test-selected checkpoint († optimistic), and the paired difference to MTT (at the same lr_img scale for "
        "`@lrS` variants) with its 95 % confidence interval over seeds (** : the interval excludes 0). 'start': the "
        "real images every variant of a seed starts from (checkpoint 0), trained on alike. 'worst drop': per seed, "
        "points the worst kept checkpoint falls below checkpoint 0. Diverged runs have no accuracy and are left out.",
        "",
        "| dataset | IPC | variant | seeds | diverged | start | selected | Δ selected vs MTT [95 % CI] | final | "
        "Δ final vs MTT [95 % CI] | test-max † | Δ test-max | worst drop |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sel, fin, tmax = (r.get(m) for m in study.METRICS)
        drops = ", ".join("–" if d is None else f"{d:.1f}" for d in r["worst_drop"])
        start = "–" if r.get("start") is None else format(r["start"], ".2f")
        cells = [r["dataset"], r["ipc"], r["variant"], r["n_seeds"], len(r["diverged_seeds"]), start]
        cells += [x for m in (sel, fin, tmax) for x in (_acc(m), _fmt_ci((m or {}).get("vs_baseline")))] + [drops]
        out.append("| " + " | ".join(map(str, cells)) + " |")
    if pools:
        out += ["", "Pooled over cells: each variant minus MTT over every (dataset, IPC, seed) where both ran, "]
        out[-1] += "validation-selected checkpoints."
        out += ["", "| variant | pairs | cells | Δ vs MTT [95 % CI] |", "|---|---|---|---|"]
        for p in pools:
            out.append(
                f"| {p['variant']} | {p['vs_baseline']['n']} | {', '.join(p['cells'])} | {_fmt_ci(p['vs_baseline'])} |"
            )
    out += [
        "",
        f"This invocation {meta['wall_s'] / 3600:.2f} h on {meta['machine']} ({meta['workers']} workers); distillation "
        f"{meta['distill_s'] / 3600:.2f} h and evaluation {meta['evaluate_s'] / 3600:.2f} h of worker time; "
        f"{meta['n_runs']} runs.",
        "",
    ]
    return "\n".join(out)


def figures(records: list[dict], folder: Path) -> list[Path]:
    """Per-layer prune profile of each pruning variant (seed 0, IPC 10), one figure per dataset."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no figures (pip install matplotlib)", file=sys.stderr)
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in sorted({r["dataset"] for r in records}):
        picks = [
            r
            for r in records
            if (r["dataset"], r["ipc"], r["seed"]) == (dataset, 10, 0)
            and "diverged" not in r
            and VARIANTS.get(r["variant"], {}).get("prune_ratio", 0) > 0
        ]
        if not picks:
            continue
        layers = list(picks[0]["prune_layers"])
        fig = Figure(figsize=(12, 1.2 + 0.45 * len(picks)), layout="constrained")
        ax = fig.subplots()
        grid = [[r["prune_layers"].get(name, 0.0) for name in layers] for r in picks]
        im = ax.imshow(grid, aspect="auto", cmap="Reds", vmin=0, vmax=max(1e-9, max(max(g) for g in grid)))
        ax.set_yticks(range(len(picks)), [r["variant"] for r in picks], fontsize=8)
        ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=8)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                text = f"{v:.0f}" if v >= 1 else (f"{v:.1f}" if v > 0 else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax)
        ax.set_title(f"{dataset}, IPC 10, seed 0: % of each layer pruned per iteration (mean over the run)")
        path = folder / f"prune_profile_{dataset}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=list(PLANS), help="Default: cpu (smoke with --smoke).")
    p.add_argument("--out", type=Path, help="Study folder (required unless --smoke).")
    p.add_argument("--fashion-mnist-dir", type=Path, help="Folder with the four Fashion-MNIST IDX files.")
    p.add_argument(
        "--cifar10-dir", type=Path, help="CIFAR-10 as an image folder (train/<class>, test/<class>) or its .tar.gz."
    )
    p.add_argument("--dataset", choices=list(DATASETS), help="Run the plan's cells on this dataset instead of theirs.")
    p.add_argument(
        "--workers", type=int, help="Parallel runs (torchrun ranks, one torch thread each); default 2, 1 for scale."
    )
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), help="Only these variants (and their MTT).")
    p.add_argument("--seeds", type=int, nargs="*", help="These seeds instead of the plan's.")
    p.add_argument("--experts", type=int, help="--plan scale: experts to train (default 20).")
    p.add_argument("--expert-epochs", type=int, help="--plan scale: epochs per expert (default 30).")
    p.add_argument("--iterations", type=int, help="Distillation iterations instead of the plan's.")
    p.add_argument("--eval-runs", type=int, help="Evaluation networks per checkpoint instead of the plan's.")
    p.add_argument("--report-only", action="store_true", help="Summarise finished runs without starting any.")
    p.add_argument("--figures", type=Path, help="Also draw the per-layer prune profiles into this folder.")
    p.add_argument("--smoke", action="store_true", help="The plan (default smoke) at toy size on the embedded set")
    args = p.parse_args(argv)
    name = args.plan or ("smoke" if args.smoke else "cpu")
    plan = dict(PLANS[name])
    if args.smoke:  # toy sizes on the embedded set, into a temporary folder unless --out
        plan |= _SMOKE
        args.dataset, args.workers = "fashion-mnist-mini", 1
        args.out = args.out or Path(tempfile.mkdtemp(prefix="dpd-study-smoke-"))
    if args.out is None:
        p.error("--out is required")
    workers = args.workers or (1 if name == "scale" else 2)
    plan["experts"] = dict(plan.get("experts", {}))
    for key, value in [("num", args.experts), ("epochs", args.expert_epochs)]:
        plan["experts"] |= {key: value} if value else {}
    for key, value in [("seeds", args.seeds), ("iterations", args.iterations), ("runs", args.eval_runs)]:
        plan |= {key: value} if value else {}
    plan["checkpoint_every"] = max(1, min(plan["checkpoint_every"], plan["iterations"]))
    if args.dataset:
        cells = {}  # every cell's variants (in order, once) on this dataset
        for (_, ipc), vs in plan["cells"].items():
            cells[args.dataset, ipc] = list(dict.fromkeys(cells.get((args.dataset, ipc), []) + vs))
        plan["cells"] = cells
    if args.variants is not None:
        wanted = {*args.variants, *map(baseline, args.variants)}
        plan["cells"] = {c: [v for v in vs if v in wanted] for c, vs in plan["cells"].items()}
    t_start = time.perf_counter()
    if not args.report_only:
        datasets = dict.fromkeys(d for d, _ in plan["cells"])
        missing = [d for d in datasets if d in DIR_OF and getattr(args, DIR_OF[d]) is None]
        if missing:
            p.error(f"give the data folder of {', '.join(missing)} (--{DIR_OF[missing[0]].replace('_', '-')})")
        args.out.mkdir(parents=True, exist_ok=True)
        dirs = {d: getattr(args, DIR_OF[d]) for d in datasets if d in DIR_OF}
        dirs = {d: image_folder(v, args.out) if d.startswith("cifar10") else v for d, v in dirs.items()}
        for config in configs(plan, args.out, dirs):
            print(f"[{time.perf_counter() - t_start:7.0f} s] dpd study {config}", flush=True)
            run_study(config, workers)

    # every recorded run (diverged ones too), also those of earlier invocations with other filters
    done = collect(args.out)
    rows = study.summarise(done, baseline, list(VARIANTS))
    pools = study.pooled(done, baseline)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "plan": name,
        "n_runs": len(done),
        "workers": workers,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "wall_s": time.perf_counter() - t_start,
        "distill_s": sum(r["distill_s"] for r in done),
        "evaluate_s": sum(r["evaluate_s"] for r in done),
    }
    text = markdown(rows, meta, pools) + ("\n" + PUBLISHED + "\n" if name == "scale" else "")
    results = {"meta": meta, "summary": rows, "pooled": pools, "records": done}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(text)
    print(text)
    if args.figures:
        for path in figures(done, args.figures):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
