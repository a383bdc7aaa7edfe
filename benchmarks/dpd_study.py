r"""Does DPD beat MTT? A paired study over seeds, with 95 % confidence intervals of the differences.

Per dataset the experts are trained once (with a validation split). Per seed, MTT (rho 0) and every
pruning variant share them, the initial images, every per-iteration draw and the evaluation seeds;
each run is evaluated with ``dpd evaluate --select val``, and variant - MTT is summarised per seed
as a mean with its 95 % t-interval. A variant ``...@lrS`` of the robust plan is compared with
``mtt@lrS``; a run that diverges is recorded as such. Resumable; runs go to ``--workers`` processes
of one torch thread each. The commands and the numbers: docs/results.md, "Does DPD beat MTT?".

    python benchmarks/dpd_study.py --plan robust --fashion-mnist-dir data/fashion-mnist --out bench-out/dpd-robust
    python benchmarks/dpd_study.py --report-only --out bench-out/dpd-study --figures docs/figures/dpd-study
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch

from dpd_cli.artifacts import prune_counts
from dpd_cli.artifacts.synthetic import load
from dpd_cli.config.settings import resolve
from dpd_cli.errors import DivergedError, StorageError
from dpd_cli.recipes import distill, evaluate, experts
from dpd_cli.stats import paired  # mean, sd and 95 % t-interval of paired differences

ROOT = Path(__file__).resolve().parents[1]

#: The datasets: a CPU preset each (network, experts, evaluation); the study adds a validation split.
DATASETS = {
    "fashion-mnist": {"preset": ROOT / "examples" / "fashion-mnist-cpu.toml", "lr_img": 1000.0},
    "cifar10": {"preset": ROOT / "examples" / "cifar10-jpeg-cpu.toml", "lr_img": 100.0},
    # The embedded set (no folder needed): --dataset fashion-mnist-mini, and --smoke.
    "fashion-mnist-mini": {"preset": ROOT / "examples" / "quick.toml", "lr_img": 1000.0},
}
#: Distillation per IPC: N student steps, alpha_0, mini-batch (IPC 50 walks 100 of its 500 images per step).
IPC = {
    1: {"syn_steps": 20, "lr_teacher": 0.01},
    10: {"syn_steps": 10, "lr_teacher": 0.03},
    50: {"syn_steps": 10, "lr_teacher": 0.03, "batch_syn": 100},
}
VAL_PER_CLASS = 50

#: Every variant: the distill settings that differ from MTT's.
VARIANTS = {
    "mtt": {"prune_ratio": 0.0},
    # DPD's reading: prune the largest residuals from the loss.
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
VARIANTS.update({f"{v}@lr{sc:g}": {**VARIANTS[v], "lr_img_scale": sc} for sc in LR_SCALES for v in _ROBUST})


def baseline(variant: str) -> str:
    """The MTT run a variant is paired with: MTT at the same lr_img scale."""
    return "mtt" + variant[variant.index("@") :] if "@" in variant else "mtt"


#: Which variants run in which (dataset, IPC) cell, on which seeds, and at what length: ``cpu`` fits a
#: 2-core machine in an afternoon, ``full`` is the whole grid. Checkpoints every ``checkpoint_every``
#: iterations (0 included) are the candidates of ``--select val``.
_MAIN = ["mtt", "abs-largest-0.01", "abs-smallest-0.25", "layer-z-largest-0.05", "mtt-soft"]
PLANS = {
    "cpu": {
        "seeds": [0, 1, 2, 3, 4],
        "cells": {
            ("cifar10", 10): _MAIN,
            ("fashion-mnist", 10): ["mtt", "abs-largest-0.01", "abs-smallest-0.25", "mtt-soft"],
            ("fashion-mnist", 1): ["mtt", "abs-largest-0.01", "abs-smallest-0.25"],
            ("cifar10", 1): ["mtt", "abs-largest-0.01", "abs-smallest-0.25"],
        },
        "iterations": 150,
        "checkpoint_every": 50,
        "runs": 2,
        "eval_epochs": 300,
    },
    "full": {
        "seeds": [0, 1, 2, 3, 4],
        "cells": {(d, i): (_PAPER_VARIANTS if i == 10 else _MAIN) for d in DATASETS for i in (10, 1, 50)},
        "iterations": 300,
        "checkpoint_every": 100,
        "runs": 3,
        "eval_epochs": 300,
    },
    "robust": {
        "seeds": [0, 1, 2, 3, 4],
        "cells": {(d, 10): [f"{v}@lr{sc:g}" for sc in LR_SCALES for v in _ROBUST] for d in DATASETS},
        "iterations": 100,
        "checkpoint_every": 25,
        "runs": 2,
        "eval_epochs": 300,
    },
    "smoke": {  # the pipeline at toy size: seconds on the embedded set (--smoke)
        "seeds": [0, 1],
        "cells": {("fashion-mnist", 1): ["mtt", "abs-largest-0.05@lr1", "mtt@lr1"]},
        "iterations": 2,
        "checkpoint_every": 1,
        "runs": 1,
        "eval_epochs": 1,
        "overrides": {"max_start_epoch": 1, "expert_epochs": 1, "syn_steps": 2, "width": 8, "train_per_class": 20},
        "experts": {"num": 1, "epochs": 2, "width": 8, "train_per_class": 20},
    },
}


def _plan_jobs(plan: dict) -> list[tuple[str, int, str, int]]:
    """Every run of the plan; the robust plan's step sizes in ``LR_SCALES`` order, each over every seed, so
    that the runs done first already make complete paired comparisons."""
    jobs = [
        (d, ipc, v, seed) for seed in plan["seeds"] for (d, ipc), variants in plan["cells"].items() for v in variants
    ]
    scale = {f"{v}@lr{sc:g}": i for i, sc in enumerate(LR_SCALES) for v in _ROBUST}
    return sorted(jobs, key=lambda j: scale.get(j[2], 0))  # stable: the order above within a scale


def _data_dir(data_dir: str | None) -> dict:
    return {} if data_dir is None else {"data_dir": str(data_dir)}


def _run_dir(out: Path, dataset: str, ipc: int, variant: str, seed: int) -> Path:
    return out / dataset / f"ipc{ipc}" / variant / f"s{seed}"


def train_experts(dataset: str, out: str, data_dir: str | None, threads: int, plan_name: str) -> str:
    flags = {
        **_data_dir(data_dir),
        "val_per_class": VAL_PER_CLASS,
        "seed": 0,
        "threads": threads,
        "out": str(Path(out) / dataset / "experts"),
        **PLANS[plan_name].get("experts", {}),
    }
    s = resolve("experts", flags, DATASETS[dataset]["preset"])
    return str(experts.run(s))


def run_one(job: tuple, out: str, data_dir: str | None, plan_name: str) -> dict:
    """Distil (or resume) and evaluate one (dataset, IPC, variant, seed); returns its record."""
    dataset, ipc, variant, seed = job
    key = {"dataset": dataset, "ipc": ipc, "variant": variant, "seed": seed}
    plan = PLANS[plan_name]
    preset = DATASETS[dataset]["preset"]
    run_dir = _run_dir(Path(out), dataset, ipc, variant, seed)
    flags = {
        **_data_dir(data_dir),
        "val_per_class": VAL_PER_CLASS,
        "experts": str(Path(out) / dataset / "experts"),
        "ipc": ipc,
        "iterations": plan["iterations"],
        "checkpoint_every": plan["checkpoint_every"],
        "keep_checkpoints": "all",
        "lr_img": DATASETS[dataset]["lr_img"],
        "seed": seed,
        "threads": 1,
        "out": str(run_dir),
        "log_every": 50,
        **IPC[ipc],
        **VARIANTS[variant],
        **plan.get("overrides", {}),
    }
    flags["lr_img"] *= flags.pop("lr_img_scale", 1)
    t0 = time.perf_counter()
    try:
        done = load(run_dir / "synthetic.safetensors")[1]["iteration"] >= flags["iterations"]
    except StorageError:
        done = False
    if not done:
        resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
        try:
            distill.run(resolve("distill", {**flags, "resume": resume or None, "force": (not resume) or None}, preset))
        except DivergedError as err:  # the run stopped: record it as diverged, with no accuracy
            return {**key, "diverged": str(err), "distill_s": time.perf_counter() - t0, "evaluate_s": 0.0}
    t1 = time.perf_counter()
    ev = resolve(
        "evaluate",
        {
            "seed": seed,
            "threads": 1,
            "runs": plan["runs"],
            "epochs": plan["eval_epochs"],
            "select": "val",
            "baseline": [],
        },
        preset,
    )
    entries = [
        e
        for e in evaluate.load_eval(evaluate.eval_path(run_dir))["results"]
        if e["source"] == "distilled" and e.get("select") == "val" and e.get("settings") == ev.model_dump(mode="json")
    ]
    if not entries:
        entries = evaluate.run(ev, run_dir)["results"]
    e = entries[-1]
    t2 = time.perf_counter()
    counts, meta = prune_counts.load(run_dir / "prune_frequency.safetensors")
    layers = prune_counts.layer_stats(counts, meta["layout"], int(meta.get("iterations_pruned") or 0))["layers"]
    torch.set_num_threads(1)
    return {
        **key,
        "selected": e["mean"],
        "final": e["final_accuracy"],
        "selected_iteration": e["selected_iteration"],
        "val_accuracy": e["val_accuracy"],
        "checkpoints": e.get("checkpoints"),
        "accuracies": e["accuracies"],
        "distill_s": t1 - t0,
        "evaluate_s": t2 - t1,
        "prune_layers": {r["name"]: r["mean_pct"] for r in layers},
    }


# --- statistics and report ---------------------------------------------------------------------
def worst_drop(r: dict) -> float | None:
    """Points the worst kept checkpoint falls below checkpoint 0 (the real images it started from)."""
    means = {c["iteration"]: 100 * c["mean"] for c in r.get("checkpoints") or []}
    return means[0] - min(means.values()) if 0 in means else None


def summarise(records: list[dict]) -> list[dict]:
    """Per (dataset, IPC, variant): accuracies over seeds, and the paired difference to its MTT (``baseline``)."""
    rows = []
    cells = sorted({(r["dataset"], r["ipc"]) for r in records})
    for dataset, ipc in cells:
        cell = [r for r in records if (r["dataset"], r["ipc"]) == (dataset, ipc)]
        for variant in [v for v in VARIANTS if any(r["variant"] == v for r in cell)]:
            diverged = sorted(r["seed"] for r in cell if r["variant"] == variant and "diverged" in r)
            mine = {r["seed"]: r for r in cell if r["variant"] == variant and "diverged" not in r}
            mtt = {r["seed"]: r for r in cell if r["variant"] == baseline(variant) and "diverged" not in r}
            row = {
                "dataset": dataset,
                "ipc": ipc,
                "variant": variant,
                "n_seeds": len(mine),
                "diverged_seeds": diverged,
                "worst_drop": [worst_drop(mine[s]) for s in sorted(mine)],
            }
            if not mine:
                rows.append(row)
                continue
            for metric in ("selected", "final"):
                vals = [100 * r[metric] for r in mine.values()]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0  # sample standard deviation over seeds
                row[metric] = {"mean": statistics.fmean(vals), "std": sd}
                seeds = sorted(set(mine) & set(mtt))
                if variant != baseline(variant) and len(seeds) >= 2:
                    row[metric]["vs_mtt"] = paired([100 * (mine[s][metric] - mtt[s][metric]) for s in seeds])
            row["selected_iterations"] = [mine[s]["selected_iteration"] for s in sorted(mine)]
            # Checkpoint 0: the class-balanced real images the run starts from (a random-real baseline).
            starts = [100 * c["mean"] for r in mine.values() for c in r["checkpoints"] or [] if c["iteration"] == 0]
            row["start"] = sum(starts) / len(starts) if starts else None
            rows.append(row)
    return rows


def pooled(records: list[dict], metric: str = "selected") -> list[dict]:
    """Each variant against MTT over every (dataset, IPC, seed) where both ran: one paired test of
    "does this variant help in general", with more pairs than any single cell has."""
    records = [r for r in records if "diverged" not in r]
    mtt = {
        (r["dataset"], r["ipc"], r["variant"], r["seed"]): r for r in records if r["variant"] == baseline(r["variant"])
    }
    out = []
    for variant in [v for v in VARIANTS if v != baseline(v) and any(r["variant"] == v for r in records)]:
        diffs = [
            100 * (r[metric] - mtt[k][metric])
            for r in records
            if r["variant"] == variant
            for k in [(r["dataset"], r["ipc"], baseline(variant), r["seed"])]
            if k in mtt
        ]
        cells = sorted({(r["dataset"], r["ipc"]) for r in records if r["variant"] == variant})
        if len(diffs) >= 2:
            names = [f"{d} IPC {i}" for d, i in cells]
            out.append({"variant": variant, "metric": metric, "cells": names, "vs_mtt": paired(diffs)})
    return out


def _fmt_ci(d: dict | None) -> str:
    if not d:
        return "–"
    lo, hi = d["ci"]
    mark = " **" if lo > 0 or hi < 0 else ""
    return f"{d['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]{mark}"


NAN = {"mean": math.nan, "std": math.nan}


def markdown(rows: list[dict], meta: dict, pools: list[dict] | None = None) -> str:
    out = [
        "Test accuracy % (mean ± sample std over seeds) of the validation-selected checkpoint and of the final set, and the "
        "paired difference to MTT (at the same lr_img scale for `@lrS` variants) with its 95 % confidence interval over seeds "
        "(** : the interval excludes 0). 'start': the real images every variant of a seed starts from (checkpoint 0), trained "
        "on alike. 'worst drop': per seed, points the worst kept checkpoint falls below checkpoint 0. Diverged runs have no "
        "accuracy and are left out of the means.",
        "",
        "| dataset | IPC | variant | seeds | diverged | start | selected | Δ selected vs MTT [95 % CI] | final | "
        "Δ final vs MTT [95 % CI] | worst drop |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sel, fin = r.get("selected", NAN), r.get("final", NAN)
        drops = ", ".join("–" if d is None else f"{d:.1f}" for d in r["worst_drop"])
        out.append(
            f"| {r['dataset']} | {r['ipc']} | {r['variant']} | {r['n_seeds']} | {len(r['diverged_seeds'])} | "
            f"{'–' if r.get('start') is None else format(r['start'], '.2f')} | {sel['mean']:.2f} ± {sel['std']:.2f} | {_fmt_ci(sel.get('vs_mtt'))} | "
            f"{fin['mean']:.2f} ± {fin['std']:.2f} | {_fmt_ci(fin.get('vs_mtt'))} | {drops} |"
        )
    if pools:
        out += [
            "",
            "Pooled over cells: each variant minus MTT over every (dataset, IPC, seed) where both ran, "
            "validation-selected checkpoints.",
            "",
            "| variant | pairs | cells | Δ vs MTT [95 % CI] |",
            "|---|---|---|---|",
        ]
        for p in pools:
            out.append(f"| {p['variant']} | {p['vs_mtt']['n']} | {', '.join(p['cells'])} | {_fmt_ci(p['vs_mtt'])} |")
    out += [
        "",
        f"This invocation {meta['wall_s'] / 3600:.2f} h on {meta['machine']} ({meta['workers']} workers × 1 thread); "
        f"distillation {meta['distill_s'] / 3600:.2f} h and evaluation {meta['evaluate_s'] / 3600:.2f} h of worker time; "
        f"{meta['n_runs']} runs.",
        "",
    ]
    return "\n".join(out)


def figures(records: list[dict], folder: Path) -> list[Path]:
    """Per-layer prune profile of each pruning variant (seed 0, IPC 10), one panel per dataset."""
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
            if r["dataset"] == dataset
            and r["ipc"] == 10
            and r["seed"] == 0
            and "diverged" not in r
            and VARIANTS[r["variant"]].get("prune_ratio", 0) > 0
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
                ax.text(
                    j, i, f"{v:.0f}" if v >= 1 else (f"{v:.1f}" if v > 0 else ""), ha="center", va="center", fontsize=6
                )
        fig.colorbar(im, ax=ax)
        ax.set_title(f"{dataset}, IPC 10, seed 0: % of each layer pruned per iteration (mean over the run)")
        path = folder / f"prune_profile_{dataset}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=list(PLANS), default="cpu")
    p.add_argument("--out", type=Path, help="Study folder (required unless --smoke).")
    p.add_argument("--fashion-mnist-dir", type=Path, help="Folder with the four Fashion-MNIST IDX files.")
    p.add_argument("--cifar10-dir", type=Path, help="CIFAR-10 as an image folder (train/<class>, test/<class>).")
    p.add_argument("--dataset", choices=list(DATASETS), help="Run the plan's cells on this dataset instead of theirs.")
    p.add_argument("--workers", type=int, default=2, help="Parallel runs, one torch thread each.")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), help="Only these variants (and their MTT).")
    p.add_argument("--seeds", type=int, nargs="*", help="These seeds instead of the plan's.")
    p.add_argument("--report-only", action="store_true", help="Summarise finished runs without starting any.")
    p.add_argument("--figures", type=Path, help="Also draw the per-layer prune profiles into this folder.")
    p.add_argument("--smoke", action="store_true", help="--plan smoke on the embedded set, a temporary --out")
    args = p.parse_args(argv)
    if args.smoke:
        args.plan, args.dataset, args.workers = "smoke", "fashion-mnist-mini", 1
        args.out = args.out or Path(tempfile.mkdtemp(prefix="dpd-study-smoke-"))
    if args.out is None:
        p.error("--out is required")
    plan = dict(PLANS[args.plan])
    if args.seeds:
        plan["seeds"] = args.seeds
    if args.dataset:
        plan["cells"] = {(args.dataset, ipc): v for (_, ipc), v in plan["cells"].items()}
    dirs = {"fashion-mnist": args.fashion_mnist_dir, "cifar10": args.cifar10_dir, "fashion-mnist-mini": None}
    datasets = list(dict.fromkeys(c[0] for c in plan["cells"]))
    wanted = None if args.variants is None else {*args.variants, *map(baseline, args.variants)}
    jobs = [j for j in _plan_jobs(plan) if j[0] in datasets and (wanted is None or j[2] in wanted)]
    args.out.mkdir(parents=True, exist_ok=True)
    records_path = args.out / "records.jsonl"
    records = {}
    if records_path.exists():
        for line in records_path.read_text().splitlines():
            r = json.loads(line)
            records[(r["dataset"], r["ipc"], r["variant"], r["seed"])] = r
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:7.0f} s] {msg}", flush=True)  # noqa: E731

    if not args.report_only:
        missing = [d for d in datasets if dirs[d] is None and d != "fashion-mnist-mini"]
        if missing:
            p.error(f"give the data folder of {', '.join(missing)} (--{missing[0]}-dir)")
        todo = [j for j in jobs if j not in records]
        log(f"{len(jobs)} runs in the plan (by seed), {len(todo)} to do, {args.workers} workers")
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
            for d in datasets:  # experts first: every run of a dataset needs them
                log(f"{d}: experts")
                pool.submit(train_experts, d, str(args.out), dirs[d] and str(dirs[d]), args.workers, args.plan).result()
            futures = {
                pool.submit(run_one, j, str(args.out), dirs[j[0]] and str(dirs[j[0]]), args.plan): j for j in todo
            }
            for fut in as_completed(futures):
                job = futures[fut]
                rec = records[job] = fut.result()
                with open(records_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                log(
                    f"{job}: diverged: {rec['diverged'][:120]}"
                    if "diverged" in rec
                    else f"{job}: selected {100 * rec['selected']:.2f} (it {rec['selected_iteration']}), final {100 * rec['final']:.2f} "
                    f"[{rec['distill_s']:.0f} + {rec['evaluate_s']:.0f} s]"
                )

    # every recorded run (diverged ones too), also those of earlier invocations with other filters
    done = list(records.values())
    rows, pools = summarise(done), pooled(done)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "plan": args.plan,
        "n_runs": len(done),
        "workers": args.workers,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "wall_s": time.perf_counter() - t_start,
        "distill_s": sum(r["distill_s"] for r in done),
        "evaluate_s": sum(r["evaluate_s"] for r in done),
    }
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "summary": rows, "pooled": pools, "records": done}, indent=2)
    )
    (args.out / "results.md").write_text(markdown(rows, meta, pools))
    print(markdown(rows, meta, pools))
    if args.figures:
        for path in figures(done, args.figures):
            log(f"wrote {path}")


if __name__ == "__main__":
    main()
