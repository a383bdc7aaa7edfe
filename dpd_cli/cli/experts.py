"""``dpd experts``: train expert trajectories; ``dpd experts import``: convert MTT/FTD/DATM replay buffers.

``experts`` is a group whose callback trains when no subcommand follows, so ``dpd experts --num 5``
works as a plain command would, and ``dpd experts import SRC...`` is its one subcommand.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import typer

from dpd_cli.cli.errors import fail
from dpd_cli.cli.options import ENVIRONMENT_HELP, Command, Group, argument
from dpd_cli.cli.runner import Report, settings_command
from dpd_cli.text import plural

__all__ = ["experts_app"]


def _report(settings, folder: Path) -> Report:
    from dpd_cli.artifacts.experts import summarize

    summary = summarize(folder)
    accs = [e["final_test_accuracy"] for e in summary["experts"] if e["final_test_accuracy"] is not None]
    mean = sum(accs) / len(accs) if accs else float("nan")
    line = f"{plural(len(accs), 'expert')} in {folder} (final test accuracy mean {mean:.2%}). Next: dpd distill "
    return Report(summary, [line + f"--dataset {settings.dataset}" + (f" --experts {folder}" if settings.out else "")])


train = settings_command(
    "experts",
    report=_report,
    summary="Train expert trajectories on real data (one safetensors file per expert; reruns skip finished ones).\n\n"
    "`dpd experts import SRC...` converts MTT/FTD/DATM replay buffers instead (see `dpd experts import --help`).",
    examples=[
        ("dpd experts --config examples/quick.toml", "the embedded dataset, with settings sized for a CPU"),
        ("dpd experts --dataset cifar10 --zca --num 50 --device cuda", "MTT's CIFAR-10 experts, on a GPU"),
        ("dpd experts --dataset cifar10 --print-config", "show the settings and where each comes from, then exit"),
    ],
)


def _import_report(settings, result: dict) -> Report:
    before = sum(r["n_experts"] for r in result["files"]) - result["converted"]
    what = f"{plural(result['epochs'], 'epoch')} each, {result['model_tag']}, {result['dataset']} {'with' if result['zca'] else 'without'} ZCA"
    unknown = ", ".join(k.replace("_", " ") for k in result["unknown"])
    if any(k in result["unknown"] for k in ("lr", "batch")):
        unknown += " (state the training settings with --lr, --momentum, --weight-decay, --batch, --dsa/--no-dsa to record them)"
    lines = [
        f"{plural(result['n_experts'], 'imported expert')} in {result['folder']} ({what}): {result['converted']} converted now"
        + (f", {before} already there" if before else "")
        + f", from {plural(len(result['files']), 'buffer file')}.",
        f"Not recorded by the buffers: {unknown}.",
        f"Next: dpd distill --experts {result['folder']}",
    ]
    return Report(result, lines)


_SOURCES_HELP = "replay_buffer_<n>.pt files, or folders holding them (read in the order of n)."
experts_import = settings_command(
    "experts_import",
    report=_import_report,
    arguments=[argument("sources", list[str], "SRC", _SOURCES_HELP)],
    summary="Convert MTT / FTD / DATM replay buffers (replay_buffer_<n>.pt) into a dpd experts folder that `dpd distill` "
    "uses like trained experts.\n\n"
    "The buffers hold parameters only: give the dataset, whether they were trained with ZCA, and the network "
    "(shapes are checked parameter by parameter). Files are read with PyTorch's weights-only loader, which builds tensors and lists and nothing else. "
    "Reruns convert only what is missing.",
    examples=[
        ("dpd experts import buffers/CIFAR10/ConvNet --dataset cifar10 --zca", "MTT's CIFAR-10 ZCA buffers"),
        (
            "dpd experts import buffers/CIFAR10_NO_ZCA/ConvNet/replay_buffer_0.pt --dataset cifar10 --no-zca --lr 0.01 "
            "--batch 256",
            "one file, recording the known training settings",
        ),
        (
            "dpd experts import buffers/Tiny/ConvNetD4 --dataset tiny-imagenet --data-dir data/tiny-imagenet-200 --no-zca "
            "--depth 4",
            "MTT's Tiny ImageNet buffers (ConvNetD4)",
        ),
    ],
)


def experts(ctx: typer.Context, **values) -> None:
    """The group's callback: train when no subcommand follows; refuse training options before one."""
    sub = ctx.invoked_subcommand
    if sub is None:
        return train(**values)
    given = [p.opts[0] for p in ctx.command.params if values.get(p.name) not in (None, False)]
    if given:
        raise fail(
            f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of `dpd experts` "
            f"(training). Put the options of `dpd experts {sub}` after `{sub}`: dpd experts {sub} SRC... "
            f"{' '.join(given)} ...",
            traceback=False,
        )


_context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
experts.__signature__ = inspect.Signature([_context, *inspect.signature(train).parameters.values()])
experts.__doc__ = train.__doc__  # the group's --help is the training command's
experts_app = typer.Typer(
    cls=Group,
    invoke_without_command=True,
    no_args_is_help=False,
    epilog=ENVIRONMENT_HELP,
    subcommand_metavar="[import SRC...]",
    pretty_exceptions_enable=False,
)
experts_app.callback(invoke_without_command=True)(experts)
experts_app.command("import", cls=Command, epilog=ENVIRONMENT_HELP)(experts_import)
