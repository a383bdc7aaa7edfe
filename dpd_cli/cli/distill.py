"""``dpd distill``: distil a synthetic set with trajectory matching + DPD."""

from __future__ import annotations

from pathlib import Path

from dpd_cli.cli.runner import Report, settings_command


def _report(settings, run_dir: Path) -> Report:
    from dpd_cli.artifacts.run import summarize

    summary = summarize(run_dir)
    return Report(
        summary,
        [
            f"Synthetic set: {summary['synthetic']} ({summary['n_images']} images, alpha {summary['lr']:.5g}). "
            f"Next: dpd evaluate {run_dir}"
        ],
    )


distill = settings_command(
    "distill",
    report=_report,
    summary="Distil a synthetic set by trajectory matching with Difference-Driven Pruning (rho = 0 is MTT).",
    examples=[
        ("dpd distill --config examples/quick.toml", "the embedded dataset, with settings sized for a CPU"),
        (
            "dpd distill --dataset cifar10 --zca --ipc 10 --prune-ratio 0.01",
            "CIFAR-10 at 10 images per class, rho 0.01",
        ),
        ("dpd distill --config examples/quick.toml --resume", "continue that run from its last checkpoint"),
    ],
)
