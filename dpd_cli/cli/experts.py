"""``dpd experts``: train expert trajectories."""

from __future__ import annotations

from pathlib import Path

from dpd_cli.cli.runner import Report, settings_command


def _report(settings, folder: Path) -> Report:
    from dpd_cli.artifacts.experts import summarize

    summary = summarize(folder)
    accs = [e["final_test_accuracy"] for e in summary["experts"] if e["final_test_accuracy"] is not None]
    mean = sum(accs) / len(accs) if accs else float("nan")
    return Report(summary, [f"{len(accs)} experts in {folder} (final test accuracy mean {mean:.2%}). Next: dpd distill "
                            f"--dataset {settings.dataset}" + (f" --experts {folder}" if settings.out else "")])


experts = settings_command(
    "experts", report=_report,
    summary="Train expert trajectories on real data (one safetensors file per expert; reruns skip finished ones).",
    examples=[
        ("dpd experts --config examples/quick.toml", "the embedded dataset, with settings sized for a CPU"),
        ("dpd experts --dataset cifar10 --zca --num 50 --device cuda", "MTT's CIFAR-10 experts, on a GPU"),
        ("dpd experts --dataset cifar10 --print-config", "show the settings and where each comes from, then exit"),
    ],
)
