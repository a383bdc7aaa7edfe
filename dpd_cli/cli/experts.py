"""``dpd experts``: train expert trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from dpd_cli.cli.console import make_sink, out_console, print_json
from dpd_cli.cli.errors import handle_errors
from dpd_cli.cli.options import Config, Json, Quiet, flags_from, setting

_C = "experts"


def experts(
    dataset: Annotated[Optional[str], setting(_C, "dataset")] = None,
    num: Annotated[Optional[int], setting(_C, "num")] = None,
    epochs: Annotated[Optional[int], setting(_C, "epochs")] = None,
    model: Annotated[Optional[str], setting(_C, "model")] = None,
    width: Annotated[Optional[int], setting(_C, "width")] = None,
    depth: Annotated[Optional[int], setting(_C, "depth")] = None,
    norm: Annotated[Optional[str], setting(_C, "norm")] = None,
    pool: Annotated[Optional[str], setting(_C, "pool")] = None,
    lr: Annotated[Optional[float], setting(_C, "lr")] = None,
    momentum: Annotated[Optional[float], setting(_C, "momentum")] = None,
    weight_decay: Annotated[Optional[float], setting(_C, "weight_decay")] = None,
    batch: Annotated[Optional[int], setting(_C, "batch")] = None,
    dsa: Annotated[Optional[bool], setting(_C, "dsa", "--dsa/--no-dsa")] = None,
    zca: Annotated[Optional[bool], setting(_C, "zca", "--zca/--no-zca")] = None,
    data_dir: Annotated[Optional[Path], setting(_C, "data_dir")] = None,
    train_per_class: Annotated[Optional[int], setting(_C, "train_per_class")] = None,
    val_per_class: Annotated[Optional[int], setting(_C, "val_per_class")] = None,
    out: Annotated[Optional[Path], setting(_C, "out")] = None,
    seed: Annotated[Optional[int], setting(_C, "seed")] = None,
    device: Annotated[Optional[str], setting(_C, "device")] = None,
    threads: Annotated[Optional[int], setting(_C, "threads")] = None,
    config: Config = None,
    quiet: Quiet = False,
    json_out: Json = False,
) -> None:
    """Train expert trajectories on real data (one safetensors file per expert; reruns skip finished ones)."""
    flags = flags_from(locals())
    with handle_errors():
        from dpd_cli.engine import experts as engine
        from dpd_cli.settings import resolve

        s = resolve(_C, flags, config)
        sink = make_sink(_C, quiet, json_out)
        try:
            folder = engine.run(s, sink)
        finally:
            sink.close()
        summary = engine.summarize(folder)
        if json_out:
            print_json(summary)
        elif not quiet:
            accs = [e["final_test_accuracy"] for e in summary["experts"]]
            mean = sum(accs) / len(accs) if accs else float("nan")
            out_console().print(
                f"{len(accs)} experts in {folder} (final test accuracy mean {mean:.2%}). Next: dpd distill "
                f"--dataset {s.dataset}" + (f" --experts {folder}" if s.out else ""),
                highlight=False, soft_wrap=True,
            )
