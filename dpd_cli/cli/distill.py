"""``dpd distill``: distil a synthetic set with trajectory matching + DPD."""

from __future__ import annotations

from dpd_cli.cli.console import out_console, print_json
from dpd_cli.cli.runner import Output, settings_command


def _run(settings, sink):
    from dpd_cli.engine import distill as engine

    return engine.run(settings, sink)


def _report(settings, run_dir, output: Output) -> int:
    from dpd_cli.engine import distill as engine

    summary = engine.summarize(run_dir)
    if output.json:
        print_json(summary)
    elif not output.quiet:
        out_console().print(
            f"Synthetic set: {run_dir / engine.SYNTHETIC} ({summary['n_images']} images, alpha {summary['lr']:.5g}). "
            f"Next: dpd evaluate {run_dir}",
            highlight=False, soft_wrap=True,
        )
    return 0


distill = settings_command(
    "distill", run=_run, report=_report,
    summary="Distil a synthetic set by trajectory matching with Difference-Driven Pruning (rho = 0 is MTT).",
    examples=[
        ("dpd distill --config examples/quick.toml", "the embedded dataset, with settings sized for a CPU"),
        ("dpd distill --dataset cifar10 --zca --ipc 10 --prune-ratio 0.01", "CIFAR-10 at 10 images per class, rho 0.01"),
        ("dpd distill --out runs/x --resume", "continue a stopped run from its last checkpoint"),
    ],
)
