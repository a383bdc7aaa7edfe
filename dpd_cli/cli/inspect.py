"""``dpd inspect``: what a run directory, an experts folder or a dpd file holds, and whether it is intact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from dpd_cli.cli.console import out_console, print_json, sparkline
from dpd_cli.cli.errors import handle_errors
from dpd_cli.cli.options import examples_help, keep_text
from dpd_cli.cli.results import below_note, divergence_note, results_table, selection_note
from dpd_cli.errors import SettingsError

__all__ = ["inspect"]

_MAX_LAYER_ROWS = 15
_MAX_EXPERT_ROWS = 20
_META_WIDTH = 52  # characters of a metadata value shown before "…"
#: How to get matplotlib, which --plot needs (the package's `plot` extra).
PLOT_INSTALL = 'pip install "dpd-cli[plot]"'

SUMMARY = (
    "Show what a run directory, an experts folder or a dpd .safetensors file holds, and check its files.\n\n"
    "Broken files inside a folder are reported, not fatal. Exit code 2 when PATH itself is missing or unreadable."
)
EXAMPLES = [
    ("dpd inspect runs/quick", "a run: settings, state, curves, pruning by layer, evaluations, files"),
    ("dpd inspect runs/quick --export-grid quick.png --plot curves.png", "also draw the images and the curves"),
    ("dpd inspect runs/quick/checkpoints/ckpt-000200.safetensors --json", "one file, as JSON"),
]


def _check_png_target(flag: str, out: Path) -> None:
    """An image output must end in .png and go into a folder that exists (it is not created)."""
    if out.suffix.lower() != ".png":
        raise SettingsError(f"{flag} writes a PNG image; give a file name ending in .png (got {out}).")
    folder = out.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise SettingsError(
            f"{flag} {out}: the folder {folder} {what}. Create it first, or give a path in an existing folder."
        )


def _require_matplotlib() -> None:
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise SettingsError(
            f"--plot needs matplotlib, which is not installed. Install it with `{PLOT_INSTALL}` "
            "(or `pip install matplotlib`), or leave --plot out."
        ) from None


def inspect(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH",
            show_default=False,
            parser=keep_text,
            help="A run directory, an experts folder, or a .safetensors file written by dpd.",
        ),
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    export_grid: Annotated[
        str | None,
        typer.Option(
            "--export-grid",
            metavar="FILE.png",
            show_default=False,
            help="Write the synthetic images as a PNG grid, one row per class (a run, or a synthetic/checkpoint file).",
        ),
    ] = None,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            metavar="FILE.png",
            show_default=False,
            help=escape(
                "Draw loss, alpha and per-layer prune % (a run) or parameter distance and accuracy "
                f"(experts) as a PNG; needs matplotlib: {PLOT_INSTALL}."
            ),
        ),
    ] = None,
    expert_epochs: Annotated[
        int | None,
        typer.Option(
            "--expert-epochs",
            min=1,
            metavar="INT",
            show_default=False,
            help="M of the experts' parameter distance |theta_t - theta_t+M| (default: 2, as distill).",
        ),
    ] = None,
) -> None:
    with handle_errors():
        from dpd_cli.reports import inspect as engine

        path = Path(path)
        grid_out = None if export_grid is None else Path(export_grid)
        plot_out = None if plot is None else Path(plot)
        for flag, out in (("--export-grid", grid_out), ("--plot", plot_out)):
            if out is not None:
                _check_png_target(flag, out)
        kind = engine.detect(path)
        if grid_out is not None and kind == "experts":
            raise SettingsError(
                f"{path} is an experts folder: it holds trajectories, not images. Give --export-grid a run directory."
            )
        if plot_out is not None and kind == "file":
            raise SettingsError(
                f"--plot draws a run directory or an experts folder, not a single file ({path}). "
                "Pass the folder the file belongs to."
            )
        if plot_out is not None:
            from dpd_cli.cli.plot import plot as draw  # matplotlib (optional): only for --plot

            _require_matplotlib()

        facts = engine.inspect(path, expert_epochs)
        exports: dict[str, Any] = {}
        if grid_out is not None:
            exports["grid"] = engine.export_grid(path, grid_out)
        if plot_out is not None:
            written = draw(facts, plot_out)
            if written is None:  # matplotlib was importable above; the engine could not use it
                raise SettingsError(f"--plot could not import matplotlib: `{PLOT_INSTALL}`.")
            exports["plot"] = {"path": str(written)}

    if json_out:
        print_json("inspect", {**facts, "exports": exports})
    else:
        con = out_console()
        {"run": _show_run, "experts": _show_experts, "file": _show_file}[facts["kind"]](con, facts)
        _show_exports(con, exports)


inspect.__doc__ = examples_help(SUMMARY, EXAMPLES, settings=False)


# --- shared pieces ----------------------------------------------------------------------------
def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _num(x: float | None, digits: int = 4) -> str:
    return "?" if x is None else f"{x:.{digits}g}"


def _pct(x: float | None, digits: int = 2) -> str:
    return "?" if x is None else f"{100 * x:.{digits}f}%"


def _heading(con: Console, text: str) -> None:
    con.print()
    con.print(Text(text, style="bold"))


def _put(con: Console, renderable: RenderableType | str, style: str = "") -> None:
    """Print indented by two columns; wrapped lines keep the indent."""
    if isinstance(renderable, str):
        renderable = Text(renderable, style=style)
    con.print(Padding(renderable, (0, 0, 0, 2), expand=False), highlight=False)


def _facts_grid(rows: list[tuple[str, str]]) -> Table:
    """Aligned ``key  value`` lines; values wrap under themselves."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    for k, v in rows:
        if v:
            grid.add_row(k, _cell(v))
    return grid


def _cell(value: str | Text) -> Text:
    """Table cells as Text: file names and metadata may contain ``[...]``, which is not markup."""
    return value if isinstance(value, Text) else Text(str(value))


def _add_row(table: Table, *cells: str | Text) -> None:
    table.add_row(*(_cell(c) for c in cells))


def _table(*columns: tuple[str, str]) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", padding=(0, 1))
    for name, justify in columns:
        table.add_column(name, justify=justify, overflow="fold")
    return table


def _warnings(con: Console, warnings: list[str]) -> None:
    if not warnings:
        return
    _heading(con, f"Warnings ({len(warnings)})")
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="yellow")
    grid.add_column(overflow="fold")
    for w in warnings:
        grid.add_row("!", _cell(w))
    _put(con, grid)


def _show_exports(con: Console, exports: dict) -> None:
    grid = exports.get("grid")
    if grid:
        src = Path(grid["source"]).name
        con.print()
        con.print(Text(f"Wrote {grid['path']}: {grid['n_images']} images from {src} (iteration {grid['iteration']})."))
    p = exports.get("plot")
    if p and p["path"]:
        con.print(Text(f"Wrote {p['path']}."))


def _evaluation(con: Console, ev: dict | None) -> None:
    if ev is None:
        return
    _heading(con, f"Evaluation ({ev['file']}): test accuracy %, mean ± std (runs)")
    if not ev["results"]:
        _put(con, "no results" + ("" if ev["valid"] else " (the file is unreadable; see the warnings)"))
        return
    results = ev["results"]
    _put(con, results_table(results))
    for note, style in (
        (selection_note(results), "dim"),
        (divergence_note(results), "dim"),
        (below_note(results), "bold red"),
    ):
        if note:
            _put(con, note, style)
    older = ev["n_entries"] - len(results)
    if older > 0:
        _put(
            con,
            f"The latest result per model, protocol and source is shown; {ev['file']} holds {older} older one{'s' if older > 1 else ''}.",
            "dim",
        )


def _prune_table(con: Console, pruning: dict, title: str) -> None:
    n_it = pruning["iterations_pruned"]
    _heading(con, title)
    if not n_it:
        _put(con, "No iteration pruned anything yet (prune ratio 0 is plain MTT, or the warm-up is not over).")
        return
    _put(
        con,
        f"{pruning['overall_pct']:.2f}% of the {pruning['n_params']:,} parameters per iteration, over {n_it:,} pruned "
        f"iteration{'s' if n_it != 1 else ''}; {pruning['ever_pct']:.1f}% were pruned at least once.",
    )
    table = _table(
        ("layer", "left"),
        ("shape", "left"),
        ("params", "right"),
        ("mean %", "right"),
        ("ever %", "right"),
        ("", "left"),
    )
    layers = pruning["layers"]
    top = max((r["mean_pct"] for r in layers), default=0.0) or 1.0
    for rank, r in enumerate(layers[:_MAX_LAYER_ROWS]):
        bar = "█" * round(10 * r["mean_pct"] / top) if r["mean_pct"] > 0 else ""
        name = Text(r["name"], style="bold red" if rank < 3 and r["mean_pct"] > 0 else "")
        _add_row(
            table,
            name,
            "×".join(map(str, r["shape"])) or "scalar",
            f"{r['size']:,}",
            f"{r['mean_pct']:.2f}",
            f"{r['ever_pct']:.1f}",
            Text(bar, style="red"),
        )
    if len(layers) > _MAX_LAYER_ROWS:
        _add_row(
            table,
            Text(f"... {len(layers) - _MAX_LAYER_ROWS} more layers (--json lists all)", style="dim"),
            "",
            "",
            "",
            "",
            "",
        )
    _put(con, table)
    _put(
        con,
        "mean %: share of the layer pruned in an average pruned iteration; ever %: share pruned at least once.",
        "dim",
    )


# --- run --------------------------------------------------------------------------------------
def _show_run(con: Console, f: dict) -> None:
    s = f["settings"]
    st = f["state"]
    syn = f["synthetic"]
    con.print(Text.assemble(("Run directory ", "bold"), f["path"]))
    images = ""
    if syn:
        images = f", {syn['n_images']} images ({syn['ipc']} per class, {'×'.join(map(str, syn['image_shape']))})"
    elif s.get("ipc"):
        images = f", {s['ipc']} per class"
    rho = s.get("prune_ratio")
    if rho is None:
        pruning = ""
    elif rho == 0:
        pruning = "ratio 0: no pruning (plain MTT)"
    else:
        warm = f", warm-up {s['prune_warmup']}" if s.get("prune_warmup") else ""
        pruning = f"ratio {rho:g}, scope {s.get('prune_scope')}, criterion {s.get('prune_criterion')}{warm}"
    distill = ""
    if s:
        distill = (
            f"syn-steps {s.get('syn_steps')}, expert-epochs {s.get('expert_epochs')}, max-start-epoch "
            f"{s.get('max_start_epoch')}, memory {s.get('memory')}"
            + (f" (keep-graphs {s['keep_graphs']})" if s.get("keep_graphs") else "")
            + f", seed {s.get('seed')}"
        )
    experts = f["experts_folder"] or ""
    if experts and f["n_experts"]:
        experts += f" ({f['n_experts']} experts)"
    _put(
        con,
        _facts_grid(
            [
                ("dataset", (f["dataset"] or "?") + images + (", ZCA" if s.get("zca") else "")),
                ("model", f["model_tag"] or ""),
                ("labels", _labels_line(syn)),
                ("pruning", pruning),
                ("distill", distill),
                ("experts", experts),
                ("state", _state_line(st, f["path"])),
            ]
        ),
    )

    loss, alpha = f["loss"], f["alpha"]
    if loss or alpha:
        _heading(con, "Curves")
        rows = []
        if loss:
            rows.append(
                (
                    "loss",
                    f"{sparkline(loss['values'], 30)}  first {_num(loss['first'])}, last {_num(loss['last'])}, "
                    f"min {_num(loss['min'])} at iteration {loss['min_iteration']}",
                )
            )
        if alpha:
            start = f" (start {_num(f['alpha_initial'])})" if f["alpha_initial"] is not None else ""
            rows.append(
                ("α (lr)", f"{sparkline(alpha['values'], 30)}  {_num(alpha['first'])} → {_num(alpha['last'])}{start}")
            )
        _put(con, _facts_grid(rows))
    elif st["iteration"]:
        _put(con, "(no readable metrics.jsonl: no curves)", "dim")

    if f["pruning"]:
        _prune_table(con, f["pruning"], "Pruning by layer (most pruned first)")
    if syn and syn.get("soft_labels"):
        _soft_label_table(con, syn["soft_labels"])
    _evaluation(con, f["evaluation"])

    _heading(con, "Files")
    table = _table(("file", "left"), ("size", "right"), ("status", "left"))
    for entry in f["files"]:
        status = {
            True: Text("ok", style="green"),
            False: Text("INVALID", style="bold red"),
            None: Text("-", style="dim"),
        }[entry["valid"]]
        _add_row(table, entry["name"], _size(entry["size"]), status)
    _put(con, table)
    _warnings(con, f["warnings"])
    if f["evaluation"] is None and st["status"] == "finished":
        con.print()
        con.print(Text(f"Next: dpd evaluate {f['path']}"))


def _labels_line(syn: dict | None) -> str:
    """One line on the labels of a synthetic set (``describe``'s dict): hard, or soft with their mass."""
    if not syn:
        return ""
    mass = syn.get("soft_labels")
    if not mass:
        return "hard (one class per image)"
    src = syn.get("soft_label_source") or {}
    origin = f", learned from expert {src['expert']}'s logits at epoch {src['epoch']}" if "epoch" in src else ""
    own = sum(c["own"] for c in mass) / len(mass)
    low = min(mass, key=lambda c: c["own"])
    return (
        f"soft{origin}; on average {own:.0%} of an image's label mass is on its own class "
        f"(lowest: {low['class']}, {low['own']:.0%})"
    )


def _soft_label_table(con: Console, mass: list[dict]) -> None:
    _heading(con, "Soft labels by class (mean over the class's images)")
    table = _table(("class", "left"), ("own class", "right"), ("most mass", "left"))
    for c in mass:
        top = ", ".join(f"{t['class']} {t['mass']:.0%}" for t in c["top"])
        _add_row(table, c["class"], Text(f"{c['own']:.0%}", style="bold red" if c["own"] < 0.5 else ""), top)
    _put(con, table)
    _put(con, "A network trains on the softmax of each image's learned logits instead of its class.", "dim")


def _state_line(st: dict, path: str) -> str:
    done, planned = st["iteration"], st["iterations"]
    of = f"{done}/{planned} iterations" if planned else f"{done} iterations"
    if st["status"] == "finished":
        return f"finished ({of})"
    if st["status"] == "running":
        return f"running ({of} so far; a dpd process holds the run's lock)"
    if st["status"] == "resumable":
        return (
            f"stopped at {of}; resumable from checkpoint {st['checkpoint_iteration']} (rerun the same "
            f"`dpd distill` command with --resume)"
        )
    return f"stopped at {of}; no checkpoint to resume from (rerun `dpd distill` with --force to start over)"


# --- experts ----------------------------------------------------------------------------------
def _show_experts(con: Console, f: dict) -> None:
    con.print(Text.assemble(("Experts folder ", "bold"), f["path"]))
    tr = f["training"]
    training = ", ".join(
        x
        for x in [
            f"lr {tr['lr']:g}" if tr.get("lr") is not None else "",
            f"momentum {tr['momentum']:g}" if tr.get("momentum") else "",
            f"weight decay {tr['weight_decay']:g}" if tr.get("weight_decay") else "",
            f"batch {tr['batch']}" if tr.get("batch") else "",
            "" if tr.get("dsa") is None else f"DSA {'on' if tr['dsa'] else 'off'}",
            "" if tr.get("zca") is None else f"ZCA {'on' if tr['zca'] else 'off'}",
            f"{tr['train_per_class']} images per class" if tr.get("train_per_class") else "",
            f"seed {tr['seed']}" if tr.get("seed") is not None else "",
        ]
        if x
    )
    count = f"{f['count']}"
    if f["n_planned"] is not None and f["count"] < f["n_planned"]:
        count += f" of {f['n_planned']}"
    if f["being_written"]:
        count += ", being written (a dpd experts process holds the folder's lock)"
    elif f["n_planned"] is not None and f["count"] < f["n_planned"]:
        count += " (stopped early: rerun the same `dpd experts` command to train the rest)"
    if f["n_compatible"] != f["count"]:
        count += f" ({f['n_compatible']} usable, see the warnings)"
    acc = f["accuracy"]
    accuracy = ""
    if acc["mean"] is not None:
        accuracy = f"final test accuracy {_pct(acc['mean'])} mean (min {_pct(acc['min'])}, max {_pct(acc['max'])})"
    model = f["model_tag"] or "?"
    if f["n_params"]:
        model += f", {f['n_params']:,} parameters"
    _put(
        con,
        _facts_grid(
            [
                ("experts", count),
                ("dataset", f["dataset"] or "?"),
                ("model", model),
                ("epochs", str(f["epochs"]) if f["epochs"] is not None else ""),
                ("training", training),
                ("accuracy", accuracy),
                *([("imported", _imported(f["imported"]))] if f.get("imported") else []),
            ]
        ),
    )

    d = f["distance"]
    if d and d["values"]:
        _heading(
            con, f"Parameter distance ‖θ(t) − θ(t+{d['m']})‖ per start epoch t (mean over {d['n_experts']} experts)"
        )
        v = d["values"]
        _put(con, f"{sparkline(v, 40)}  t=0: {_num(v[0])}, t={d['t'][-1]}: {_num(v[-1])}, max {_num(max(v))}")
        if d["n_experts_total"] > d["n_experts"]:
            _put(con, f"Computed on the first {d['n_experts']} of {d['n_experts_total']} experts, to stay fast.", "dim")

    if f["experts"]:
        _heading(con, "Experts")
        table = _table(("file", "left"), ("epochs", "right"), ("final test acc", "right"), ("status", "left"))
        for e in f["experts"][:_MAX_EXPERT_ROWS]:
            if not e["valid"]:
                status = Text("INVALID", style="bold red")
            elif not e.get("compatible"):
                status = Text("mismatch", style="yellow")
            else:
                status = Text("ok", style="green")
            _add_row(
                table,
                e["file"],
                str(e.get("epochs", "")),
                _pct(e.get("final_test_accuracy")) if e["valid"] else "",
                status,
            )
        if len(f["experts"]) > _MAX_EXPERT_ROWS:
            _add_row(
                table,
                Text(f"... {len(f['experts']) - _MAX_EXPERT_ROWS} more (--json lists all)", style="dim"),
                "",
                "",
                "",
            )
        _put(con, table)
    _warnings(con, f["warnings"])


def _imported(record: dict) -> str:
    n = len(record["files"])
    text = f"from {n} replay buffer file{'s' if n != 1 else ''} ({record['format']})"
    if record["unknown"]:
        text += "; not recorded: " + ", ".join(k.replace("_", " ") for k in record["unknown"])
    return text


# --- single file ------------------------------------------------------------------------------
_DETAIL_LABELS = {
    "dataset": "dataset",
    "n_images": "images",
    "image_shape": "image shape",
    "n_classes": "classes",
    "ipc": "per class",
    "iteration": "iteration",
    "iterations": "of",
    "alpha": "alpha",
    "zca": "ZCA",
    "model_tag": "model",
    "index": "expert",
    "epochs": "epochs",
    "n_params": "parameters",
    "final_test_accuracy": "final test acc",
    "fingerprint": "fingerprint",
}


def _detail(key: str, value: Any) -> str:
    if value is None:
        return "?"
    if key == "final_test_accuracy":
        return _pct(value)
    if key == "alpha":
        return _num(value, 5)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return "×".join(map(str, value))
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _compact(value: Any) -> tuple[str, bool]:
    """A one-line rendering of a metadata value, and whether it was cut."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "), default=str)
    if len(text) <= _META_WIDTH:
        return text, False
    return text[: _META_WIDTH - 1] + "…", True


def _show_file(con: Console, f: dict) -> None:
    con.print(Text.assemble(("File ", "bold"), f["path"], f" ({_size(f['size'])})"))
    fmt = f["format"] or "none (not a dpd file)"
    if f["format_version"]:
        fmt += f" version {f['format_version']}"
    rows = [
        ("format", fmt),
        ("written by", f"dpd {f['written_by']}" if f["written_by"] else "?"),
        ("status", "valid" if f["valid"] else "INVALID: " + " ".join(f["problems"])),
    ]
    if f["part_of"]:
        what = "run" if f["part_of"]["kind"] == "run" else "experts folder"
        rows.append(
            ("part of", f"{what} {f['part_of']['path']} (`dpd inspect {f['part_of']['path']}` shows all of it)")
        )
    details = f["details"] or {}
    if f["format"] in ("dpd.synthetic", "dpd.checkpoint") and details:
        d = details
        rows += [
            ("dataset", f"{d['dataset']}, {d['n_classes']} classes" + (", ZCA" if d["zca"] else "")),
            ("images", f"{d['n_images']} ({d['ipc']} per class, {_detail('image_shape', d['image_shape'])})"),
            ("iteration", f"{d['iteration']} of {d['iterations']}"),
            ("α (lr)", _num(d["alpha"], 5)),
            ("labels", _labels_line(d)),
            ("model", d["model_tag"] or "?"),
        ]
    elif f["format"] != "dpd.prune_counts":  # prune counts get their table below
        rows += [(_DETAIL_LABELS.get(k, k), _detail(k, v)) for k, v in details.items()]
    _put(con, _facts_grid(rows))

    _heading(con, f"Tensors ({len(f['tensors'])})")
    table = _table(("name", "left"), ("dtype", "left"), ("shape", "left"), ("size", "right"))
    for t in f["tensors"]:
        _add_row(table, t["name"], t["dtype"], "×".join(map(str, t["shape"])) or "scalar", _size(t["bytes"]))
    _put(con, table)

    if f["metadata"]:
        _heading(con, "Metadata")
        table = _table(("key", "left"), ("value", "left"))
        cut = False
        for k, v in sorted(f["metadata"].items()):
            text, was_cut = _compact(v)
            cut |= was_cut
            _add_row(table, k, text)
        _put(con, table)
        if cut:
            _put(con, "Long values are cut (…); --json shows them in full.", "dim")
    if f["format"] in ("dpd.synthetic", "dpd.checkpoint") and details.get("soft_labels"):
        _soft_label_table(con, details["soft_labels"])
    if f["format"] == "dpd.prune_counts" and details:
        _prune_table(con, details, "Pruning by layer (most pruned first)")
    _evaluation(con, f["evaluation"])
    _warnings(con, f["warnings"])
