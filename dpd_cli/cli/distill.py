"""``dpd distill``: distil a synthetic set with trajectory matching + DPD."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dpd_cli.cli.runner import Report, settings_command
from dpd_cli.config.settings import Resolved
from dpd_cli.text import plural


def _report(settings, result: Path | list[Path]) -> Report:
    """One run's summary; with --seeds ``{"runs": [...]}``, one per run."""
    from dpd_cli.artifacts.run import summarize

    dirs = result if isinstance(result, list) else [result]
    summaries = [summarize(d) for d in dirs]
    text = [
        f"Synthetic set: {s['synthetic']} ({plural(s['n_images'], 'image')}, alpha {s['lr']:.5g}). Next: dpd evaluate {d}"
        for s, d in zip(summaries, dirs, strict=True)
    ]
    return Report({"runs": summaries} if isinstance(result, list) else summaries[0], text)


def _complete(resolved: Resolved) -> Resolved:
    """The settings the run uses: those the experts folder decides adopted from it, as the recipe does."""
    from dpd_cli.recipes.distill_inputs import with_experts_sources  # torch: only now

    settings, sources = with_experts_sources(resolved.settings)
    return dataclasses.replace(resolved, settings=settings, sources={**resolved.sources, **sources})


distill = settings_command(
    "distill",
    report=_report,
    complete=_complete,
    summary="Distil a synthetic set by trajectory matching with Difference-Driven Pruning (rho = 0 is MTT).",
    examples=[
        ("dpd distill --config examples/quick.toml", "the embedded dataset, with settings sized for a CPU"),
        (
            "dpd distill --dataset cifar10 --zca --ipc 10 --prune-ratio 0.01",
            "CIFAR-10 at 10 images per class, rho 0.01",
        ),
        ("dpd distill --config examples/quick.toml --resume", "continue that run from its last checkpoint"),
        (
            "dpd distill --config examples/quick.toml --seeds 0,1,2",
            "three runs in one batch: runs/quick-s0, runs/quick-s1, runs/quick-s2",
        ),
    ],
)
