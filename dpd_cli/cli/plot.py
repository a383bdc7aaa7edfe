"""``dpd inspect --plot``: a run's or an experts folder's curves as a PNG, drawn from ``inspect``'s facts."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
from matplotlib.ticker import MaxNLocator

from dpd_cli.io import storage
from dpd_cli.text import plural

__all__ = ["plot"]


def plot(facts: dict, out: Path) -> Path:
    """Draw a run's loss, α and per-layer prune %, or an experts folder's distance and accuracy curves."""
    if facts["kind"] == "run":
        fig = Figure(figsize=(12, 3.8), layout="constrained")
        ax_loss, ax_alpha, ax_prune = fig.subplots(1, 3)
        _line(ax_loss, facts["loss"], "matching loss", "iteration")
        _line(ax_alpha, facts["alpha"], "α (student step size)", "iteration")
        layers = (facts["pruning"] or {}).get("layers", [])[:20][::-1]
        if layers:
            ax_prune.barh([r["name"] for r in layers], [r["mean_pct"] for r in layers], color="tab:red")
            ax_prune.set_xlabel("mean % of the layer pruned per iteration")
            ax_prune.tick_params(axis="y", labelsize=7)
        else:
            ax_prune.text(0.5, 0.5, "no pruning data", ha="center", va="center", transform=ax_prune.transAxes)
        ax_prune.set_title("pruning by layer")
        fig.suptitle(f"{facts['path']} ({facts['state']['iteration']}/{facts['state']['iterations']} iterations)")
    else:
        fig = Figure(figsize=(9, 3.8), layout="constrained")
        ax_d, ax_a = fig.subplots(1, 2)
        d = facts["distance"] or {}
        _line(
            ax_d,
            {"iterations": d.get("t", []), "values": d.get("values", [])},
            f"‖θ(t) − θ(t+{d.get('m', '?')})‖ (mean of {plural(d.get('n_experts', 0), 'expert')})",
            "start epoch t",
        )
        for e in facts["experts"]:
            if e.get("compatible") and e.get("test_accuracy"):
                ax_a.plot(_percent(e["test_accuracy"]), color="0.75", linewidth=0.8)
        ax_a.plot(_percent(facts["accuracy"]["mean_per_epoch"]), color="tab:blue", label="mean")
        ax_a.set_title("test accuracy (%)")
        ax_a.set_xlabel("epoch")
        ax_a.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle(f"{facts['path']} ({plural(facts['count'], 'expert')})")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    with storage.atomic_write(Path(out)) as f:
        f.write(buf.getvalue())
    return Path(out)


def _line(ax, curve: dict | None, title: str, xlabel: str) -> None:
    if curve and curve["values"]:
        ax.plot(curve["iterations"], curve["values"], marker="." if len(curve["values"]) < 50 else None)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _percent(accuracies: list[float | None]) -> list[float]:
    return [float("nan") if a is None else 100 * a for a in accuracies]
