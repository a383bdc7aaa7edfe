"""``dpd experts``: train expert trajectories."""

from __future__ import annotations

from dpd_cli.cli.console import out_console, print_json
from dpd_cli.cli.runner import Output, settings_command


def _run(settings, sink):
    from dpd_cli.engine import experts as engine

    return engine.run(settings, sink)


def _report(settings, folder, output: Output) -> int:
    from dpd_cli.engine import experts as engine

    summary = engine.summarize(folder)
    if output.json:
        print_json(summary)
    elif not output.quiet:
        accs = [e["final_test_accuracy"] for e in summary["experts"]]
        mean = sum(accs) / len(accs) if accs else float("nan")
        out_console().print(
            f"{len(accs)} experts in {folder} (final test accuracy mean {mean:.2%}). Next: dpd distill "
            f"--dataset {settings.dataset}" + (f" --experts {folder}" if settings.out else ""),
            highlight=False, soft_wrap=True,
        )
    return 0


experts = settings_command(
    "experts", run=_run, report=_report,
    summary="Train expert trajectories on real data (one safetensors file per expert; reruns skip finished ones).",
    examples=[
        ("dpd experts --config examples/quick.toml", "the embedded dataset, with settings sized for a CPU"),
        ("dpd experts --dataset cifar10 --zca --num 50 --device cuda", "MTT's CIFAR-10 experts, on a GPU"),
        ("dpd experts --dataset cifar10 --print-config", "show the settings and where each comes from, then exit"),
    ],
)
