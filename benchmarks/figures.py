"""Figures for docs/results.md from benchmark outputs (needs matplotlib: pip install -e ".[plot]").

    python benchmarks/figures.py bench-out/quality-mini docs/figures
    python benchmarks/figures.py bench-out/quality-mini/results.json docs/figures --only accuracy_vs_rho

The first argument is a ``quality.py`` output folder (its results.json) or a results JSON file.
``--only`` writes just the named figures (file names without .png), leaving the others alone.

Writes: accuracy_vs_rho.png (if the results hold several ratios), loss_curves.png (MTT vs DPD
runs of seed 0), grid_ipc*.png (distilled images of seed 0), layer_pruning.png (mean % pruned
per layer, DPD run of seed 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from dpd_cli.io import storage  # noqa: E402
from dpd_cli.data import Preprocess  # noqa: E402
from dpd_cli.artifacts.synthetic import load as load_synthetic  # noqa: E402
from dpd_cli.io.images import save_grid  # noqa: E402


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _smooth(v: list[float], k: int = 10) -> list[float]:
    return [sum(v[max(0, i - k + 1) : i + 1]) / len(v[max(0, i - k + 1) : i + 1]) for i in range(len(v))]


FIGURES = ("accuracy_vs_rho", "loss_curves", "grids", "layer_pruning")


def main(src: Path, dst: Path, only: tuple[str, ...] = FIGURES) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    data = json.loads((src / "results.json" if src.is_dir() else src).read_text())
    summary = data["summary"]
    ipcs = sorted({r["ipc"] for r in summary if r["source"] == "distilled"})

    # Accuracy vs rho, one line per (IPC, scope); random baseline dashed.
    ratios = sorted({r["ratio"] for r in summary if r["source"] == "distilled"})
    if "accuracy_vs_rho" in only and len(ratios) > 2:
        fig, ax = plt.subplots(figsize=(6, 4))
        for ipc in ipcs:
            for scope in ("global", "layer"):
                pts = sorted((r["ratio"], r["mean"], r["std"]) for r in summary
                             if r["source"] == "distilled" and r["ipc"] == ipc and (r["scope"] == scope or r["ratio"] == 0))
                if len(pts) > 1 and any(r["scope"] == scope for r in summary if r["source"] == "distilled" and r["ipc"] == ipc and r["ratio"]):
                    ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], [100 * p[2] for p in pts], marker="o", capsize=3,
                                label=f"IPC {ipc}, {scope}")
            rnd = [r for r in summary if r["source"] == "random" and r["ipc"] == ipc]
            if rnd:
                ax.axhline(100 * rnd[0]["mean"], ls="--", lw=1, color="grey")
        ax.set_xlabel("prune ratio rho")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Accuracy vs prune ratio (dashed: random real subset)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(dst / "accuracy_vs_rho.png", dpi=120)
        plt.close(fig)

    runs = {Path(r["run_dir"]).name: Path(r["run_dir"]) for r in data["records"] if r.get("run_dir")}
    if "loss_curves" in only:
        _loss_curves(runs, ipcs, dst)
    if "grids" in only:
        _grids(runs, ipcs, dst)
    if "layer_pruning" in only:
        _layer_pruning(runs, dst)


def _loss_curves(runs: dict[str, Path], ipcs: list[int], dst: Path) -> None:
    fig, axes = plt.subplots(1, len(ipcs), figsize=(5 * len(ipcs), 3.5), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        for name, run in sorted(runs.items()):
            if name.startswith(f"ipc{ipc}-") and name.endswith("-s0") and "-global-" in name:
                m = _metrics(run)
                ax.plot([x["iteration"] for x in m], _smooth([x["loss"] for x in m]), label=name.split("-")[1].replace("rho", "rho "))
        ax.set_title(f"Matching loss, IPC {ipc} (seed 0, smoothed)")
        ax.set_xlabel("iteration")
        ax.legend()
    fig.tight_layout()
    fig.savefig(dst / "loss_curves.png", dpi=120)
    plt.close(fig)


def _grids(runs: dict[str, Path], ipcs: list[int], dst: Path) -> None:
    for ipc in ipcs:
        dpd_runs = [run for name, run in sorted(runs.items()) if name.startswith(f"ipc{ipc}-") and name.endswith("-s0") and "rho0-" not in name]
        if dpd_runs:
            t, meta = load_synthetic(dpd_runs[0] / "synthetic.safetensors")
            save_grid(Preprocess.from_tensors(t).invert(t["images"]), t["labels"], len(meta["classes"]), dst / f"grid_ipc{ipc}.png")


def _layer_pruning(runs: dict[str, Path], dst: Path) -> None:
    dpd_run = next((run for name, run in sorted(runs.items()) if name.endswith("-s0") and "rho0-" not in name), None)
    if dpd_run is not None:
        t, meta = storage.load_tensors(dpd_run / "prune_frequency.safetensors", "dpd.prune_counts")
        counts, layout, iters = t["counts"].double(), meta["layout"], max(1, meta["iterations_pruned"])
        names, pct, offset = [], [], 0
        for name, shape in layout:
            n = int(torch.tensor(shape).prod()) if shape else 1
            names.append(name)
            pct.append(100 * counts[offset : offset + n].sum().item() / (n * iters))
            offset += n
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(names) + 1))
        ax.barh(names[::-1], pct[::-1], color="tab:red")
        ax.set_xlabel("mean % of the layer pruned per iteration")
        ax.set_title(f"Per-layer pruning, {dpd_run.name}")
        fig.tight_layout()
        fig.savefig(dst / "layer_pruning.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="quality.py output folder or results JSON file")
    p.add_argument("dst", type=Path, help="folder for the PNG files")
    p.add_argument("--only", nargs="+", choices=FIGURES, default=list(FIGURES))
    a = p.parse_args()
    main(a.results, a.dst, tuple(a.only))
