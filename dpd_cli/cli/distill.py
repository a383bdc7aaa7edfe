"""``dpd distill``: distil a synthetic set with trajectory matching + DPD."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from dpd_cli.cli.console import make_sink, out_console, print_json
from dpd_cli.cli.errors import handle_errors
from dpd_cli.cli.options import Config, Json, Quiet, flags_from, setting

_C = "distill"


def distill(
    ipc: Annotated[Optional[int], setting(_C, "ipc")] = None,
    prune_ratio: Annotated[Optional[float], setting(_C, "prune_ratio")] = None,
    dataset: Annotated[Optional[str], setting(_C, "dataset")] = None,
    experts: Annotated[Optional[Path], setting(_C, "experts")] = None,
    iterations: Annotated[Optional[int], setting(_C, "iterations")] = None,
    syn_steps: Annotated[Optional[int], setting(_C, "syn_steps")] = None,
    expert_epochs: Annotated[Optional[int], setting(_C, "expert_epochs")] = None,
    max_start_epoch: Annotated[Optional[int], setting(_C, "max_start_epoch")] = None,
    lr_img: Annotated[Optional[float], setting(_C, "lr_img")] = None,
    lr_lr: Annotated[Optional[float], setting(_C, "lr_lr")] = None,
    lr_teacher: Annotated[Optional[float], setting(_C, "lr_teacher")] = None,
    batch_syn: Annotated[Optional[int], setting(_C, "batch_syn")] = None,
    zca: Annotated[Optional[bool], setting(_C, "zca", "--zca/--no-zca")] = None,
    prune_scope: Annotated[Optional[str], setting(_C, "prune_scope")] = None,
    prune_criterion: Annotated[Optional[str], setting(_C, "prune_criterion")] = None,
    prune_direction: Annotated[Optional[str], setting(_C, "prune_direction")] = None,
    prune_mask: Annotated[Optional[str], setting(_C, "prune_mask")] = None,
    prune_ema_beta: Annotated[Optional[float], setting(_C, "prune_ema_beta")] = None,
    prune_mode: Annotated[Optional[str], setting(_C, "prune_mode")] = None,
    prune_warmup: Annotated[Optional[int], setting(_C, "prune_warmup")] = None,
    memory: Annotated[Optional[str], setting(_C, "memory")] = None,
    init: Annotated[Optional[str], setting(_C, "init")] = None,
    dsa: Annotated[Optional[bool], setting(_C, "dsa", "--dsa/--no-dsa")] = None,
    model: Annotated[Optional[str], setting(_C, "model")] = None,
    width: Annotated[Optional[int], setting(_C, "width")] = None,
    depth: Annotated[Optional[int], setting(_C, "depth")] = None,
    norm: Annotated[Optional[str], setting(_C, "norm")] = None,
    pool: Annotated[Optional[str], setting(_C, "pool")] = None,
    data_dir: Annotated[Optional[Path], setting(_C, "data_dir")] = None,
    train_per_class: Annotated[Optional[int], setting(_C, "train_per_class")] = None,
    val_per_class: Annotated[Optional[int], setting(_C, "val_per_class")] = None,
    checkpoint_every: Annotated[Optional[int], setting(_C, "checkpoint_every")] = None,
    keep_checkpoints: Annotated[Optional[str], setting(_C, "keep_checkpoints")] = None,
    log_every: Annotated[Optional[int], setting(_C, "log_every")] = None,
    out: Annotated[Optional[Path], setting(_C, "out")] = None,
    resume: Annotated[Optional[bool], setting(_C, "resume", "--resume")] = None,
    force: Annotated[Optional[bool], setting(_C, "force", "--force")] = None,
    seed: Annotated[Optional[int], setting(_C, "seed")] = None,
    device: Annotated[Optional[str], setting(_C, "device")] = None,
    threads: Annotated[Optional[int], setting(_C, "threads")] = None,
    config: Config = None,
    quiet: Quiet = False,
    json_out: Json = False,
) -> None:
    """Distil a synthetic set by trajectory matching with Difference-Driven Pruning (rho = 0 is MTT)."""
    flags = flags_from(locals())
    # --resume / --force are switches: absent means "not given", so the env or file can set them.
    flags["resume"] = resume or None
    flags["force"] = force or None
    with handle_errors():
        from dpd_cli.engine import distill as engine
        from dpd_cli.settings import resolve

        s = resolve(_C, flags, config)
        sink = make_sink(_C, quiet, json_out)
        try:
            run_dir = engine.run(s, sink)
        finally:
            sink.close()
        summary = engine.summarize(run_dir)
        if json_out:
            print_json(summary)
        elif not quiet:
            out_console().print(
                f"Synthetic set: {summary['synthetic']} ({summary['n_images']} images, alpha {summary['lr']:.5g}). "
                f"Next: dpd evaluate {run_dir}",
                highlight=False, soft_wrap=True,
            )
