"""``dpd evaluate``: honest test accuracy of a synthetic set, with baselines."""

from __future__ import annotations

from rich.text import Text

from dpd_cli.cli.options import synthetic_target
from dpd_cli.cli.results import below_note, divergence_note, results_table, selection_note
from dpd_cli.cli.runner import Report, settings_command
from dpd_cli.errors import EXIT_BELOW_THRESHOLD


def report(settings, result: dict) -> Report:
    entries = result["results"]
    if not entries:
        return Report(None)  # a non-zero torchrun rank: rank 0 reports
    notes = [Text(n, style="dim") for n in (selection_note(entries), divergence_note(entries)) if n]
    warning = below_note(entries)
    text = [
        Text(f"Test accuracy (%) on {entries[0]['dataset']}, IPC {entries[0]['ipc']}: mean ± std (runs)", style="bold"),
        results_table(entries),
        *notes,
        *([Text(warning, style="bold red")] if warning else []),
        f"Saved to {result['eval_file']}",
    ]
    if result["passed"]:
        return Report(result, text)
    if result["below"]:
        worst = min(result["below"], key=lambda r: r["mean"])
        failed = f"Accuracy below threshold: {worst['model']} reached {100 * worst['mean']:.2f}% < --fail-under {result['fail_under']:g}%."
    else:
        failed = f"No gain from distillation ({', '.join(result['no_gain'])}; see the warning): --fail-if-no-gain."
    return Report(result, text, EXIT_BELOW_THRESHOLD, failed)


evaluate = settings_command(
    "evaluate",
    report=report,
    arguments=[synthetic_target("TARGET")],
    summary="Train fresh networks on a synthetic set and report real test accuracy (mean ± std over runs).\n\n"
    "Exit code 3 when --fail-under is given and a distilled mean accuracy is below it, or with --fail-if-no-gain "
    "when distillation did not help (the initial images score at least as well).",
    examples=[
        (
            "dpd evaluate runs/quick --config examples/quick.toml",
            "the quick preset's run, with its evaluation settings",
        ),
        ("dpd evaluate runs/cifar10-ipc10 --baseline random,full", "MTT protocol, with both baselines"),
        ("dpd evaluate runs/x --models convnet,resnet18 --fail-under 60", "two architectures; exit 3 below 60 %"),
    ],
)
