r"""Quality benchmark: experts -> distill (several prune settings) -> evaluate, over seeds, with baselines.

Writes ``results.json`` and ``results.md`` (mean ± std over seeds; each seed's figure is the mean
over its evaluation runs) into ``--out``. Resumable: rerunning the same command skips finished
experts, distillations and evaluations. Per-IPC distillation overrides go in
``--ipc-settings '{"10": {"syn_steps": 10}}'``, any other setting in ``--set experts.num=3``.
``--figures DIR`` (needs matplotlib) draws accuracy_vs_rho.png, loss_curves.png, grid_ipc*.png and
layer_pruning.png; ``--report-only`` redraws the table and figures from results.json. The commands
behind each published number are in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from dpd_cli import __version__
from dpd_cli.artifacts import prune_counts
from dpd_cli.artifacts.layout import SYNTHETIC
from dpd_cli.artifacts.synthetic import load as load_synthetic
from dpd_cli.config.settings import resolve
from dpd_cli.data import Preprocess
from dpd_cli.errors import StorageError
from dpd_cli.io.images import save_grid
from dpd_cli.recipes import distill, evaluate, experts

ROOT = Path(__file__).resolve().parents[1]
#: --smoke: the embedded set's preset at toy sizes.
SMOKE_SETS = [
    "experts.num=1",
    "experts.epochs=2",
    "experts.width=8",
    "experts.train_per_class=20",
    "distill.width=8",
    "distill.train_per_class=20",
    "distill.iterations=2",
    "distill.syn_steps=2",
    "distill.max_start_epoch=1",
    "distill.expert_epochs=1",
    "distill.checkpoint_every=1",
    "evaluate.epochs=1",
    "evaluate.runs=1",
    "evaluate.full_epochs=1",
]


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {"experts": {}, "distill": {}, "evaluate": {}}
    for pair in pairs:
        key, _, value = pair.partition("=")
        command, _, field = key.partition(".")
        out[command][field] = _parse_value(value)
    return out


def _done_distill(run_dir: Path, iterations: int) -> bool:
    try:
        _, meta = load_synthetic(run_dir / SYNTHETIC)
        return int(meta["iteration"]) >= iterations
    except StorageError:
        return False


def _eval_entries(target: Path, source: str, model: str) -> list[dict]:
    try:
        data = evaluate.load_eval(evaluate.eval_path(target))
    except StorageError:
        return []
    return [e for e in data["results"] if e["source"] == source and e["model"] == model]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="Preset with [experts], [distill], [evaluate] tables (required to run).")
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.05])
    p.add_argument("--scopes", nargs="+", default=["global"], choices=["global", "layer"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--baselines", nargs="*", default=["random", "full"], choices=["random", "full", "init"])
    p.add_argument("--ipc-settings", type=json.loads, default={}, help="JSON: {ipc: {distill setting: value}}.")
    p.add_argument("--set", dest="sets", action="append", default=[], help="command.field=value override (repeatable).")
    p.add_argument("--shared-experts", action="store_true", help="One experts folder (first seed) for every seed.")
    p.add_argument("--out", type=Path, help="Output folder (required unless --smoke).")
    p.add_argument("--report-only", action="store_true", help="Run nothing: redraw from results.json.")
    p.add_argument("--figures", type=Path, help="Draw the figures into this folder.")
    p.add_argument("--smoke", action="store_true", help="The whole pipeline at toy size on the embedded set.")
    args = p.parse_args(argv)
    if args.smoke:
        args.config, args.ipc, args.ratios, args.seeds, args.baselines = (
            ROOT / "examples" / "quick.toml",
            [1],
            [0.0, 0.05],
            [0],
            ["random"],
        )
        args.sets = SMOKE_SETS + args.sets
        args.out = args.out or Path(tempfile.mkdtemp(prefix="quality-smoke-"))
        args.figures = args.figures or args.out / "figures"
    if args.out is None or (args.config is None and not args.report_only):
        p.error("--out and --config are required (or --smoke)")
    out: Path = args.out
    if args.report_only:
        data = json.loads((out / "results.json").read_text())
        print(_markdown(data["summary"], data["meta"]))
        if args.figures:
            figures(data, args.figures)
        return

    over = _overrides(args.sets)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:7.0f} s] {msg}", flush=True)  # noqa: E731
    records: list[dict] = []
    timings: dict[str, float] = {}

    def timed(key: str, fn):
        t = time.perf_counter()
        result = fn()
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
        return result

    def evaluated(target: Path, source: str, ev, model: str, stage: str, **fields) -> None:
        """Evaluate ``model`` on ``target`` unless done already; record its latest result with ``fields``."""
        if not _eval_entries(target, source, model):
            log(f"{target.name}: evaluating {source} / {model}")
            timed(stage, lambda: evaluate.run(ev.model_copy(update={"models": [model]}), target))
        e = _eval_entries(target, source, model)[-1]
        rec = {**fields, "source": source, "model": model, "mean": e["mean"], "accuracies": e["accuracies"]}
        if source == "distilled":
            rec.update(select=e.get("select", "final"), selected_iteration=e.get("selected_iteration"))
            rec["final"] = e.get("final_accuracy", e["mean"])
        records.append(rec)

    for seed in args.seeds:
        ex_seed = args.seeds[0] if args.shared_experts else seed
        ex_settings = resolve(
            "experts", {**over["experts"], "seed": ex_seed, "out": out / f"experts-s{ex_seed}"}, args.config
        )
        log(f"seed {seed}: experts -> {ex_settings.out}")
        folder = timed("experts", lambda: experts.run(ex_settings))
        for ipc in args.ipc:
            extra = args.ipc_settings.get(str(ipc), {})
            for scope in args.scopes:
                for ratio in args.ratios:
                    if ratio == 0 and scope != args.scopes[0]:
                        continue  # rho = 0 is MTT whatever the scope
                    name = f"ipc{ipc}-rho{ratio:g}-{scope}-s{seed}"
                    run_dir = out / name
                    flags = {
                        **over["distill"],
                        **extra,
                        "ipc": ipc,
                        "prune_ratio": ratio,
                        "prune_scope": scope,
                        "seed": seed,
                        "experts": folder,
                        "out": run_dir,
                    }
                    ds = resolve("distill", flags, args.config)
                    if _done_distill(run_dir, ds.iterations):
                        log(f"{name}: distilled already")
                    else:
                        resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
                        ds = resolve(
                            "distill", {**flags, "resume": resume or None, "force": (not resume) or None}, args.config
                        )
                        log(f"{name}: distilling ({ds.iterations} iterations, N={ds.syn_steps})")
                        timed(f"distill ipc{ipc}", lambda ds=ds: distill.run(ds))
                    ev = resolve("evaluate", {**over["evaluate"], "seed": seed, "baseline": []}, args.config)
                    for model in ev.models:
                        fields = {"ratio": ratio, "scope": scope, "run_dir": str(run_dir)}
                        evaluated(run_dir, "distilled", ev, model, f"evaluate ipc{ipc}", seed=seed, ipc=ipc, **fields)
            # Baselines: once per seed and IPC, evaluated through the rho-0 run's synthetic file for the data and transform.
            base_dir = out / f"ipc{ipc}-rho{args.ratios[0]:g}-{args.scopes[0]}-s{seed}"
            for b in args.baselines:
                if b == "full" and ipc != args.ipc[0]:
                    continue  # the full-data baseline does not depend on the IPC
                ev = resolve(
                    "evaluate", {**over["evaluate"], "seed": seed, "baseline": [b], "distilled": False}, args.config
                )
                for model in ev.models:
                    fields = {"ipc": ipc if b == "random" else None, "ratio": None, "scope": None}
                    evaluated(base_dir, b, ev, model, f"baseline {b}", seed=seed, **fields)

    summary = _summarise(records)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": Path(args.config).read_text(),
        "shared_experts": args.shared_experts,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "versions": {"dpd": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "wall_s": time.perf_counter() - t_start,
        "seconds_by_stage": timings,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "records": records}, indent=2))
    (out / "results.md").write_text(_markdown(summary, meta))
    print(_markdown(summary, meta))
    if args.figures:
        figures({"summary": summary, "records": records}, args.figures)


def _stats(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def _summarise(records: list[dict]) -> list[dict]:
    """Per (model, source, IPC, ratio, scope): mean ± std over seeds of the reported accuracy, and of the final set's."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = (r["model"], r["source"], r["ipc"], r["ratio"], r["scope"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (model, source, ipc, ratio, scope), recs in groups.items():
        vals = [r["mean"] for r in recs]
        m, s = _stats(vals)
        row = {
            "model": model,
            "source": source,
            "ipc": ipc,
            "ratio": ratio,
            "scope": scope,
            "mean": m,
            "std": s,
            "n_seeds": len(vals),
            "per_seed": vals,
        }
        if source == "distilled":
            finals = [r.get("final", r["mean"]) for r in recs]
            row["final_mean"], row["final_std"] = _stats(finals)
            row["final_per_seed"] = finals
            row["select"] = recs[0].get("select", "final")
            row["selected_iterations"] = [r.get("selected_iteration") for r in recs]
        rows.append(row)
    return rows


def _markdown(summary: list[dict], meta: dict) -> str:
    """Test accuracy of the final set, and of the checkpoint chosen on the validation split where there is one."""
    lines = [
        "| model | IPC | method | final set (%) | validation-selected (%) | selected iterations | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {"random": 0, "init": 1, "distilled": 2, "full": 3}
    for r in sorted(
        summary,
        key=lambda r: (
            r["model"],
            r["ipc"] if r["ipc"] is not None else 10**9,
            order[r["source"]],
            r["scope"] or "",
            r["ratio"] or 0,
        ),
    ):
        if r["source"] == "distilled":
            method = "MTT (rho 0)" if r["ratio"] == 0 else f"DPD rho {r['ratio']:g} {r['scope']}"
        else:
            method = {"random": "random real subset", "full": "full training set", "init": "the initial images"}[
                r["source"]
            ]
        ipc = "all" if r["ipc"] is None else str(r["ipc"])
        if r["source"] == "distilled":
            final = f"{100 * r['final_mean']:.2f} ± {100 * r['final_std']:.2f}"
            chosen = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}" if r["select"] == "val" else "–"
            its = ", ".join(str(i) for i in r["selected_iterations"]) if r["select"] == "val" else "–"
        else:
            final, chosen, its = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}", "", ""
        lines.append(f"| {r['model']} | {ipc} | {method} | {final} | {chosen} | {its} | {r['n_seeds']} |")
    lines.append("")
    lines.append(
        f"Wall time {meta['wall_s'] / 60:.1f} min on {meta['machine']}; "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in meta["seconds_by_stage"].items())
        + "."
    )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures


def figures(data: dict, dst: Path) -> None:
    """The figures from a results.json's content into ``dst`` (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: no figures (pip install -e ".[plot]")', file=sys.stderr)
        return
    dst.mkdir(parents=True, exist_ok=True)
    summary = data["summary"]
    dist = [r for r in summary if r["source"] == "distilled"]
    ipcs = sorted({r["ipc"] for r in dist})
    runs = [r for r in data["records"] if r.get("run_dir")]
    first = [r for r in runs if r["seed"] == min(x["seed"] for x in runs)] if runs else []
    dpd_runs = [r for r in first if r["ratio"]]

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(dst / f"{name}.png", dpi=120)
        plt.close(fig)

    if len({r["ratio"] for r in dist}) > 2:  # one line per (IPC, scope); random dashed
        fig, ax = plt.subplots(figsize=(6, 4))
        for ipc in ipcs:
            for scope in ("global", "layer"):
                pts = sorted(
                    (r["ratio"], 100 * r["mean"], 100 * r["std"])
                    for r in dist
                    if r["ipc"] == ipc and (r["scope"] == scope or r["ratio"] == 0)
                )
                if any(p[0] for p in pts) and any(r["scope"] == scope and r["ratio"] for r in dist if r["ipc"] == ipc):
                    ax.errorbar(*zip(*pts), marker="o", capsize=3, label=f"IPC {ipc}, {scope}")
            for r in summary:
                if r["source"] == "random" and r["ipc"] == ipc:
                    ax.axhline(100 * r["mean"], ls="--", lw=1, color="grey")
        ax.set(
            xlabel="prune ratio rho",
            ylabel="test accuracy (%)",
            title="Accuracy vs prune ratio (dashed: random real subset)",
        )
        ax.legend()
        save(fig, "accuracy_vs_rho")
    if first:
        fig, axes = plt.subplots(1, len(ipcs), figsize=(5 * len(ipcs), 3.5), squeeze=False)
        for ax, ipc in zip(axes[0], ipcs):
            for r in sorted((r for r in first if r["ipc"] == ipc and r["scope"] == "global"), key=lambda r: r["ratio"]):
                m = [
                    json.loads(x) for x in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines() if x.strip()
                ]
                loss = [x["loss"] for x in m]
                smooth = [sum(loss[max(0, i - 9) : i + 1]) / len(loss[max(0, i - 9) : i + 1]) for i in range(len(loss))]
                ax.plot([x["iteration"] for x in m], smooth, label=f"rho {r['ratio']:g}")
            ax.set(title=f"Matching loss, IPC {ipc} (first seed, smoothed)", xlabel="iteration")
            ax.legend()
        save(fig, "loss_curves")
    for ipc in ipcs:
        run = next((Path(r["run_dir"]) for r in dpd_runs if r["ipc"] == ipc), None)
        if run is not None:
            t, meta = load_synthetic(run / SYNTHETIC)
            images = Preprocess.from_tensors(t).invert(t["images"])
            save_grid(images, t["labels"], len(meta["classes"]), dst / f"grid_ipc{ipc}.png")
    if dpd_runs:
        run = Path(dpd_runs[0]["run_dir"])
        counts, meta = prune_counts.load(run / "prune_frequency.safetensors")
        layers = prune_counts.layer_stats(counts, meta["layout"], max(1, int(meta.get("iterations_pruned") or 0)))[
            "layers"
        ]
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(layers) + 1))
        ax.barh([r["name"] for r in layers][::-1], [r["mean_pct"] for r in layers][::-1], color="tab:red")
        ax.set(xlabel="mean % of the layer pruned per iteration", title=f"Per-layer pruning, {run.name}")
        save(fig, "layer_pruning")


if __name__ == "__main__":
    main()
