"""``dpd evaluate``: honest test accuracy of a synthetic set, with baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from dpd_cli.cli.console import error_console, make_sink, out_console, print_json
from dpd_cli.cli.errors import handle_errors
from dpd_cli.cli.options import Config, Json, Quiet, flags_from, raw_path, setting
from dpd_cli.errors import EXIT_BELOW_THRESHOLD

_C = "evaluate"


def evaluate(
    target: Annotated[Path, typer.Argument(help="A run directory, a synthetic.safetensors file, or a checkpoint.", show_default=False,
                                           parser=raw_path)],
    models: Annotated[Optional[str], setting(_C, "models")] = None,
    runs: Annotated[Optional[int], setting(_C, "runs")] = None,
    protocol: Annotated[Optional[str], setting(_C, "protocol")] = None,
    epochs: Annotated[Optional[int], setting(_C, "epochs")] = None,
    lr: Annotated[Optional[float], setting(_C, "lr")] = None,
    batch: Annotated[Optional[int], setting(_C, "batch")] = None,
    momentum: Annotated[Optional[float], setting(_C, "momentum")] = None,
    weight_decay: Annotated[Optional[float], setting(_C, "weight_decay")] = None,
    dsa: Annotated[Optional[bool], setting(_C, "dsa", "--dsa/--no-dsa")] = None,
    baseline: Annotated[Optional[str], setting(_C, "baseline")] = None,
    select: Annotated[Optional[str], setting(_C, "select")] = None,
    full_epochs: Annotated[Optional[int], setting(_C, "full_epochs")] = None,
    distilled: Annotated[Optional[bool], setting(_C, "distilled", "--distilled/--no-distilled")] = None,
    fail_under: Annotated[Optional[float], setting(_C, "fail_under")] = None,
    data_dir: Annotated[Optional[Path], setting(_C, "data_dir")] = None,
    seed: Annotated[Optional[int], setting(_C, "seed")] = None,
    device: Annotated[Optional[str], setting(_C, "device")] = None,
    threads: Annotated[Optional[int], setting(_C, "threads")] = None,
    config: Config = None,
    quiet: Quiet = False,
    json_out: Json = False,
) -> None:
    """Train fresh networks on a synthetic set and report real test accuracy (mean ± std over runs).

    Exit code 3 when --fail-under is given and a distilled mean accuracy is below it.
    """
    flags = flags_from(locals())
    flags.pop("target")
    with handle_errors():
        from dpd_cli.engine import evaluate as engine
        from dpd_cli.settings import resolve

        s = resolve(_C, flags, config)
        sink = make_sink(_C, quiet, json_out)
        try:
            result = engine.run(s, target, sink)
        finally:
            sink.close()
        if not result["results"]:
            return  # a non-zero torchrun rank: rank 0 reports
        below = [r for r in result["results"] if r["source"] == "distilled" and s.fail_under is not None and 100 * r["mean"] < s.fail_under]
        if json_out:
            print_json({**result, "fail_under": s.fail_under, "passed": not below})
        elif not quiet:
            out_console().print(results_table(result["results"]))
            for note in (selection_note(result["results"]), divergence_note(result["results"])):
                if note:
                    out_console().print(note, highlight=False)
            out_console().print(f"Saved to {result['eval_file']}", highlight=False)
    for warning in result.get("warnings", []):
        error_console().print(f"Warning: {warning}", highlight=False, soft_wrap=True)
    if below:
        worst = min(below, key=lambda r: r["mean"])
        error_console().print(
            f"Accuracy below threshold: {worst['model']} reached {100 * worst['mean']:.2f}% < --fail-under {s.fail_under:g}%.",
            highlight=False,
        )
        raise typer.Exit(EXIT_BELOW_THRESHOLD)


def results_table(entries: list[dict]) -> Table:
    """Rows = architectures, columns = distilled / random / full, cells = mean ± std (%)."""
    sources = [src for src in ("distilled", "init", "random", "full") if any(e["source"] == src for e in entries)]
    first = entries[0]
    table = Table(title=f"Test accuracy, {first['dataset']}, IPC {first['ipc']}, protocol {first['protocol']} "
                        f"({first['runs']} run{'s' if first['runs'] > 1 else ''} each)")
    table.add_column("model")
    for src in sources:
        table.add_column({"distilled": "distilled", "init": "initial images", "random": "random real", "full": "full data"}[src],
                         justify="right")
    for model in dict.fromkeys(e["model"] for e in entries):
        cells = []
        for src in sources:
            hit = [e for e in entries if e["model"] == model and e["source"] == src]
            mark = "†" if hit and hit[-1].get("optimistic") else ""
            cells.append(f"{100 * hit[-1]['mean']:.2f} ± {100 * hit[-1]['std']:.2f}{mark}" if hit else "")
        table.add_row(model, *cells)
    return table


def selection_note(entries: list[dict]) -> str | None:
    """Which checkpoint the distilled column is, and how it was chosen (optimistic when by test accuracy)."""
    lines = []
    for e in entries:
        if e["source"] != "distilled" or len(e.get("checkpoints") or []) < 2:
            continue
        its = [c["iteration"] for c in e["checkpoints"]]
        how = {"val": f"the best validation accuracy ({100 * e['val_accuracy']:.2f}%)",
               "test-max": "the best TEST accuracy: optimistic, selected on the test set as published tables are",
               "final": "the last one"}[e["select"]]
        lines.append(f"{e['model']}: distilled = checkpoint {e['selected_iteration']} of {len(its)} ({', '.join(map(str, its))}), "
                     f"chosen by {how}; the final set scores {100 * e['final_accuracy']:.2f}%.")
    return "\n".join(lines) or None


def divergence_note(entries: list[dict]) -> str | None:
    """A paragraph on trainings whose loss became NaN/Inf (they count at the accuracy they ended with)."""
    hit = [e for e in entries if e.get("diverged_runs")]
    if not hit:
        return None
    n = sum(len(e["diverged_runs"]) for e in hit)
    total = sum(e["runs"] for e in entries)
    where = "; ".join(f"{e['source']} / {e['model']} run{'s' if len(e['diverged_runs']) > 1 else ''} "
                      f"{', '.join(map(str, e['diverged_runs']))} (lr {e['lr']:.4g})" for e in hit)
    return (f"{n} of {total} trainings diverged (training loss became NaN/Inf): {where}. They count in the means at "
            "the accuracy they ended with. A lower learning rate usually trains them: rerun with a lower --lr than "
            "the one shown; networks without normalisation layers (alexnet) are the most sensitive.")
