"""``dpd study``: variants of ``dpd distill`` against a baseline over seeds, as a table of paired differences."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.text import Text

from dpd_cli.cli.console import make_sink, out_console, print_json
from dpd_cli.cli.errors import handle_errors
from dpd_cli.cli.options import examples_help
from dpd_cli.cli.results import table

__all__ = ["study", "study_table"]

SUMMARY = (
    "Run a paired study: every variant of [study] on every seed, from the same experts, evaluated with "
    "--select val, and each variant minus the baseline per seed (mean, 95 % t-interval over seeds).\n\n"
    "CONFIG holds a [study] table (seeds, variants, baseline) besides the usual [experts], [distill] and "
    "[evaluate] settings; see docs/guide.md. Runs of one seed share the initial images, every per-iteration "
    "draw and the evaluation seeds. Resumable: a rerun reuses finished runs and resumes the others. Under torchrun "
    "the runs are spread over the ranks, each rank batching its share (--concurrent)."
)
EXAMPLES = [
    ("dpd study examples/study-quick.toml", "DPD against MTT on the embedded dataset, 3 seeds"),
    ("dpd study examples/study-quick.toml --report-only --json", "the table of the finished runs, as JSON"),
    ("torchrun --nproc-per-node 4 -m dpd_cli study study.toml", "four runs at a time"),
    ("dpd study study.toml --concurrent 4", "four runs at a time as one batched computation"),
]


def study(
    config: Annotated[str, typer.Argument(metavar="CONFIG", show_default=False, help="The study's TOML file.")],
    out: Annotated[
        str | None,
        typer.Option(
            "--out", metavar="DIR", help=escape("Study folder (default: [study] out, else runs/study-<CONFIG name>).")
        ),
    ] = None,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Summarise the finished runs; start none.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress output (errors still go to stderr).")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout; no progress.")] = False,
    concurrent: Annotated[
        int | None,
        typer.Option(
            "--concurrent",
            metavar="K",
            min=1,
            help=escape(
                "Runs distilled at once as one computation, each writing the run directory it would alone (up to "
                "rounding): batches of up to K runs, a seed's variants together, differing only in per-run settings "
                "(default: [study] concurrent, else 4 on the CPU and 8 on a GPU, where the gain is not measured yet)."
            ),
        ),
    ] = None,
) -> None:
    with handle_errors():
        from dpd_cli.recipes import study as engine  # torch: only now, not for --help

        sink = make_sink("study", quiet, json_out)
        try:
            result = engine.run(Path(config), Path(out) if out else None, report_only, sink, concurrent)
        finally:
            sink.close()
    if result["summary"] is None or os.environ.get("RANK", "0") != "0":
        return  # a non-zero torchrun rank: rank 0 reports
    if json_out:
        print_json("study", result)
    elif not quiet:
        for item in study_table(result):
            out_console().print(item, highlight=False, soft_wrap=isinstance(item, str))


study.__doc__ = examples_help(escape(SUMMARY), EXAMPLES, settings=False)


def _acc(m: dict | None) -> str:
    return "–" if not m else f"{m['mean']:.2f} ± {m['std']:.2f}"


def _diff(m: dict | None) -> str:
    d = (m or {}).get("vs_baseline")
    if not d:
        return ""
    if d["ci"] is None:
        return f"{d['mean']:+.2f} (1 seed)"
    lo, hi = d["ci"]
    return f"{d['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]" + (" *" if lo > 0 or hi < 0 else "")


def study_table(result: dict) -> list:
    """What ``dpd study`` prints: a table per (dataset, IPC), its notes, the missing runs, where it was saved."""
    rows, base = result["summary"], result["baseline"]
    if not rows:
        return [f"No finished run in {result['out']} yet: run `dpd study {result['config']}`."]
    out: list = []
    for dataset, ipc in dict.fromkeys((r["dataset"], r["ipc"]) for r in rows):
        cell = [r for r in rows if (r["dataset"], r["ipc"]) == (dataset, ipc)]
        out.append(Text(f"Test accuracy % on {dataset}, IPC {ipc}: mean ± std over seeds; Δ vs {base}", style="bold"))
        headers = ("variant", ">seeds", ">val-selected", ">Δ [95 % CI]", ">final", ">Δ [95 % CI]", ">test-max †")
        out.append(
            table(
                (*headers, ">Δ [95 % CI]"),
                [
                    (
                        r["variant"],
                        f"{r['n_seeds']}" + (f" ({len(r['diverged_seeds'])} diverged)" if r["diverged_seeds"] else ""),
                        *(f(r.get(m)) for m in ("selected", "final", "test_max") for f in (_acc, _diff)),
                    )
                    for r in cell
                ],
            )
        )
        starts = [r["start"] for r in cell if r["start"] is not None]
        if starts:
            out.append(f"Checkpoint 0 (the real images every run starts from): {sum(starts) / len(starts):.2f} %.")
    out.append(
        Text(
            "Δ: the variant minus the baseline on the same seed (same experts, initial images, draws and evaluation "
            "seeds), mean and 95 % t-interval over seeds; * the interval excludes 0. val-selected: the checkpoint "
            "best on the validation split; † test-max: the checkpoint best on the test set (optimistic).",
            style="dim",
        )
    )
    if result["missing"]:
        out.append(f"Not finished yet: {', '.join(result['missing'])}.")
    out.append(f"Saved to {Path(result['out']) / 'study.json'}")
    return out
