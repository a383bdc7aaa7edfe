"""``dpd export``: write a synthetic set in the files MTT, DATM and other tools read."""

from __future__ import annotations

from pathlib import Path

from dpd_cli.cli.options import synthetic_target
from dpd_cli.cli.runner import Report, settings_command
from dpd_cli.text import plural

__all__ = ["export"]


def _report(settings, result: dict) -> Report:
    extra = ["with the soft labels"] if result["soft_labels"] else []
    if result["zca"] and result["format"] in ("mtt", "datm"):
        extra.append("the ZCA transform in zca.pt")
    files = result["files"]
    shown = ", ".join(files[:6]) + (f", ... ({len(files)} files)" if len(files) > 6 else "")
    what = result["format"] + (", " + ", ".join(extra) if extra else "")
    readme = Path(result["out"]) / "README.txt"
    line = f"Exported {plural(result['n_images'], 'image')} ({what}) to {result['out']}: {shown}. {readme} says how to load them."
    return Report(result, [line])


export = settings_command(
    "export",
    report=_report,
    arguments=[synthetic_target("RUN_OR_FILE")],
    summary="Write a synthetic set in the files other tools read: MTT's and DATM's .pt files (with the ZCA transform "
    "for kornia), PNGs in class folders, or one NumPy archive; with a README.txt saying how to load them.\n\n"
    "The folder appears complete or not at all; an existing one is replaced only with --force.",
    examples=[
        (
            "dpd export runs/cifar10-ipc10 --format datm --out exports/c10",
            "images_best.pt, labels_best.pt, lr_best.pt, zca.pt",
        ),
        ("dpd export runs/quick --format imagefolder --out exports/quick-png", "<NN>-<class>/<i>.png in pixel space"),
        (
            "dpd export runs/quick/synthetic.safetensors --format npz --out exports/q --force",
            "replace an earlier export",
        ),
    ],
)
