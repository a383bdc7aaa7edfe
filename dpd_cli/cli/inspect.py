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
from dpd_cli.cli.results import below_note, divergence_note, results_table, selection_note, table
from dpd_cli.errors import SettingsError
from dpd_cli.text import plural

__all__ = ["inspect", "show"]

_MAX_LAYER_ROWS = 15
_MAX_EXPERT_ROWS = 20
_META_WIDTH = 52  # characters of a metadata value shown before "…"
#: How to get matplotlib, which --plot needs (the package's `plot` extra).
PLOT_INSTALL = 'pip install "dpd-cli[plot]"'

SUMMARY = (
    "Show what a run directory, an experts folder, an export folder or a .safetensors file holds, and check its "
    "files.\n\n"
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


def inspect(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH",
            show_default=False,
            parser=keep_text,
            help="A run directory, an experts folder, an export folder, or a .safetensors file.",
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
        outs = {flag: Path(out) for flag, out in (("--export-grid", export_grid), ("--plot", plot)) if out is not None}
        for flag, out in outs.items():
            _check_png_target(flag, out)
        kind = engine.detect(path)
        if "--export-grid" in outs and kind == "experts":
            raise SettingsError(
                f"{path} is an experts folder: it holds trajectories, not images. Give --export-grid a run directory."
            )
        if outs and kind == "export":
            flags = " and ".join(outs)
            raise SettingsError(
                f"{path} is an export folder (from `dpd export`): {flags} draw{'s' if len(outs) == 1 else ''} a run "
                "directory. Give the run the set was exported from (`dpd inspect` on the folder names it)."
            )
        if "--plot" in outs and kind == "file":
            raise SettingsError(
                f"--plot draws a run directory or an experts folder, not a single file ({path}). "
                "Pass the folder the file belongs to."
            )
        if "--plot" in outs:
            try:  # matplotlib is optional: imported only for --plot (checked anew: cli.plot may be imported already)
                import matplotlib.figure  # noqa: F401

                from dpd_cli.cli.plot import plot as draw
            except ImportError:
                raise SettingsError(
                    f"--plot needs matplotlib, which is not installed. Install it with `{PLOT_INSTALL}` "
                    "(or `pip install matplotlib`), or leave --plot out."
                ) from None

        facts = engine.inspect(path, expert_epochs)
        exports: dict[str, Any] = {}
        if "--export-grid" in outs:
            exports["grid"] = engine.export_grid(path, outs["--export-grid"])
        if "--plot" in outs:
            exports["plot"] = {"path": str(draw(facts, outs["--plot"]))}

    if json_out:
        print_json("inspect", {**facts, "exports": exports})
    else:
        con = show(facts)
        if "grid" in exports:
            g = exports["grid"]
            images = f"{plural(g['n_images'], 'image')} from {Path(g['source']).name} (iteration {g['iteration']})"
            con.print()
            con.print(Text(f"Wrote {g['path']}: {images}."))
        if "plot" in exports:
            con.print(Text(f"Wrote {exports['plot']['path']}."))


inspect.__doc__ = examples_help(SUMMARY, EXAMPLES, settings=False)


def show(facts: dict) -> Console:
    """Print what ``reports.inspect.inspect`` found, as ``dpd inspect`` does; returns the console."""
    con = out_console()
    {"run": _show_run, "experts": _show_experts, "export": _show_export, "file": _show_file}[facts["kind"]](con, facts)
    return con


# --- shared pieces ----------------------------------------------------------------------------
def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _num(x: float | None, digits: int = 4) -> str:
    return "?" if x is None else f"{x:.{digits}g}"


def _pct(x: float | None, digits: int = 2) -> str:
    return "?" if x is None else f"{100 * x:.{digits}f}%"


def _shape(shape: list[int]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def _title(con: Console, what: str, path: str, more: str = "") -> None:
    con.print(Text.assemble((what + " ", "bold"), path, more))


def _heading(con: Console, text: str) -> None:
    con.print()
    con.print(Text(text, style="bold"))


def _put(con: Console, renderable: RenderableType | str, style: str = "") -> None:
    """Print indented by two columns; wrapped lines keep the indent."""
    if isinstance(renderable, str):
        renderable = Text(renderable, style=style)
    con.print(Padding(renderable, (0, 0, 0, 2), expand=False), highlight=False)


def _facts_grid(rows: list[tuple[str, str]]) -> Table:
    """Aligned ``key  value`` lines, the empty ones left out; values wrap under themselves."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    for k, v in rows:
        if v:
            grid.add_row(k, Text(v))
    return grid


def _status(word: str) -> Text:
    return Text(word, style={"ok": "green", "INVALID": "bold red", "mismatch": "yellow", "-": "dim"}[word])


def _cut(rows: list[tuple], limit: int, more: str, tail: int = 0) -> list[tuple]:
    """At most ``limit`` rows shown: the first ones, a line saying how many more, then the last ``tail``."""
    if len(rows) <= limit:
        return rows
    line = (Text(f"... {len(rows) - limit} {more} (--json lists all)", style="dim"),)
    return [*rows[: limit - tail], line, *rows[len(rows) - tail :]]


def _files(con: Console, files: list[dict], limit: int | None = None) -> None:
    """The Files table; ``valid`` None is a file nothing checks."""
    _heading(con, "Files")
    rows = [
        (e["name"], _size(e["size"]), _status({True: "ok", False: "INVALID", None: "-"}[e["valid"]])) for e in files
    ]
    _put(con, table(("file", ">size", "status"), _cut(rows, limit, "more", tail=2) if limit else rows))


def _warnings(con: Console, warnings: list[str]) -> None:
    if warnings:
        _heading(con, f"Warnings ({len(warnings)})")
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="yellow")
        grid.add_column(overflow="fold")
        for w in warnings:
            grid.add_row("!", Text(w))
        _put(con, grid)


def _evaluation(con: Console, ev: dict | None) -> None:
    if ev is None:
        return
    _heading(con, f"Evaluation ({ev['file']}): test accuracy %, mean ± std (runs)")
    results = ev["results"]
    if not results:
        _put(con, "no results" + ("" if ev["valid"] else " (the file is unreadable; see the warnings)"))
        return
    _put(con, results_table(results))
    older = ev["n_entries"] - len(results)
    notes = [(selection_note(results), "dim"), (divergence_note(results), "dim"), (below_note(results), "bold red")]
    if older > 0:
        shown = "The latest result per model, protocol and source is shown"
        notes.append((f"{shown}; {ev['file']} holds {older} older one{'s' if older > 1 else ''}.", "dim"))
    for note, style in notes:
        if note:
            _put(con, note, style)


def _prune_table(con: Console, pruning: dict) -> None:
    n_it = pruning["iterations_pruned"]
    _heading(con, "Pruning by layer (most pruned first)")
    if not n_it:
        _put(con, "No iteration pruned anything yet (prune ratio 0 is plain MTT, or the warm-up is not over).")
        return
    _put(
        con,
        f"{pruning['overall_pct']:.2f}% of the {pruning['n_params']:,} parameters per iteration, over {n_it:,} pruned "
        f"iteration{'s' if n_it != 1 else ''}; {pruning['ever_pct']:.1f}% were pruned at least once.",
    )
    layers = pruning["layers"]
    top = max((r["mean_pct"] for r in layers), default=0.0) or 1.0
    rows = [
        (
            Text(r["name"], style="bold red" if rank < 3 and r["mean_pct"] > 0 else ""),
            _shape(r["shape"]),
            f"{r['size']:,}",
            f"{r['mean_pct']:.2f}",
            f"{r['ever_pct']:.1f}",
            Text("█" * round(10 * r["mean_pct"] / top) if r["mean_pct"] > 0 else "", style="red"),
        )
        for rank, r in enumerate(layers)
    ]
    headers = ("layer", "shape", ">params", ">mean %", ">ever %", "")
    _put(con, table(headers, _cut(rows, _MAX_LAYER_ROWS, "more layers")))
    note = "mean %: share of the layer pruned in an average pruned iteration; ever %: share pruned at least once."
    _put(con, note, "dim")


def _soft_label_table(con: Console, mass: list[dict]) -> None:
    _heading(con, "Soft labels by class (mean over the class's images)")
    rows = [
        (
            c["class"],
            Text(f"{c['own']:.0%}", style="bold red" if c["own"] < 0.5 else ""),
            ", ".join(f"{t['class']} {t['mass']:.0%}" for t in c["top"]),
        )
        for c in mass
    ]
    _put(con, table(("class", ">own class", "most mass"), rows))
    _put(con, "A network trains on the softmax of each image's learned logits instead of its class.", "dim")


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


# --- run --------------------------------------------------------------------------------------
def _show_run(con: Console, f: dict) -> None:
    s, st, syn = f["settings"], f["state"], f["synthetic"]
    _title(con, "Run directory", f["path"])
    images = f", {s['ipc']} per class" if s.get("ipc") else ""
    if syn:
        images = f", {syn['n_images']} images ({syn['ipc']} per class, {_shape(syn['image_shape'])})"
    rho = s.get("prune_ratio")
    pruning = "ratio 0: no pruning (plain MTT)" if rho == 0 else ""
    if rho:
        warm = f", warm-up {s['prune_warmup']}" if s.get("prune_warmup") else ""
        pruning = f"ratio {rho:g}, scope {s.get('prune_scope')}, criterion {s.get('prune_criterion')}{warm}"
    distill = ""
    if s:
        keep = f" (keep-graphs {s['keep_graphs']})" if s.get("keep_graphs") else ""
        keep += "".join(f", {k.replace('_', '-')} {s[k]:g}" for k in ("lr_img_warmup", "clip_img") if s.get(k))
        distill = (
            f"syn-steps {s.get('syn_steps')}, expert-epochs {s.get('expert_epochs')}, max-start-epoch "
            f"{s.get('max_start_epoch')}, memory {s.get('memory')}{keep}, seed {s.get('seed')}"
        )
    experts = f["experts_folder"] or ""
    if experts and f["n_experts"]:
        experts += f" ({plural(f['n_experts'], 'expert')})"
    facts = [
        ("dataset", (f["dataset"] or "?") + images + (", ZCA" if s.get("zca") else "")),
        ("model", f["model_tag"] or ""),
        ("labels", _labels_line(syn)),
        ("pruning", pruning),
        ("distill", distill),
        ("experts", experts),
        ("changed", "; ".join(_change(c) for c in f.get("changes") or [])),
        ("state", _state_line(st)),
    ]
    _put(con, _facts_grid(facts))

    loss, alpha = f["loss"], f["alpha"]
    rows = []
    if loss:
        low = f"min {_num(loss['min'])} at iteration {loss['min_iteration']}"
        spark = sparkline(loss["values"], 30)
        rows.append(("loss", f"{spark}  first {_num(loss['first'])}, last {_num(loss['last'])}, {low}"))
    if alpha:
        start = f" (start {_num(f['alpha_initial'])})" if f["alpha_initial"] is not None else ""
        spark = sparkline(alpha["values"], 30)
        rows.append(("α (lr)", f"{spark}  {_num(alpha['first'])} → {_num(alpha['last'])}{start}"))
    if rows:
        _heading(con, "Curves")
        _put(con, _facts_grid(rows))
    elif st["iteration"]:
        _put(con, "(no readable metrics.jsonl: no curves)", "dim")

    if f["pruning"]:
        _prune_table(con, f["pruning"])
    if syn and syn.get("soft_labels"):
        _soft_label_table(con, syn["soft_labels"])
    _evaluation(con, f["evaluation"])
    _files(con, f["files"])
    _warnings(con, f["warnings"])
    if f["evaluation"] is None and st["status"] == "finished":
        con.print()
        con.print(Text(f"Next: dpd evaluate {f['path']}"))


def _change(c: dict) -> str:
    """A setting a resume changed: ``--lr-img 1000 → 100 after iteration 50``."""
    name = str(c.get("setting", "?")).replace("_", "-")
    return f"--{name} {_num(c.get('from'))} → {_num(c.get('to'))} after iteration {c.get('iteration')}"


def _state_line(st: dict) -> str:
    done, planned = st["iteration"], st["iterations"]
    of = f"{done}/{planned} iterations" if planned else f"{done} iterations"
    if st["status"] == "finished":
        return f"finished ({of})"
    if st["status"] == "running":
        return f"running ({of} so far; {st.get('holder') or 'a dpd process'} holds the run's lock)"
    if st["status"] == "resumable":
        rerun = "rerun the same `dpd distill` command with --resume"
        return f"stopped at {of}; resumable from checkpoint {st['checkpoint_iteration']} ({rerun})"
    return f"stopped at {of}; no checkpoint to resume from (rerun `dpd distill` with --force to start over)"


# --- experts ----------------------------------------------------------------------------------
#: The training settings of an experts folder, as shown; lr and seed show even when 0, DSA and ZCA when off.
_TRAINING = {
    "lr": "lr {:g}",
    "momentum": "momentum {:g}",
    "weight_decay": "weight decay {:g}",
    "batch": "batch {}",
    "dsa": "DSA {}",
    "zca": "ZCA {}",
    "train_per_class": lambda n: f"{plural(n, 'image')} per class",
    "seed": "seed {}",
}


def _show_experts(con: Console, f: dict) -> None:
    _title(con, "Experts folder", f["path"])
    training = ", ".join(
        fmt(v) if callable(fmt) else fmt.format(("off", "on")[v] if isinstance(v, bool) else v)
        for k, fmt in _TRAINING.items()
        if (v := f["training"].get(k)) is not None and (v or k in ("lr", "dsa", "zca", "seed"))
    )
    count = f"{f['count']}"
    stopped = f["n_planned"] is not None and f["count"] < f["n_planned"]
    if stopped:
        count += f" of {f['n_planned']}"
    if f["being_written"]:
        count += ", being written (a dpd experts process holds the folder's lock)"
    elif stopped:
        count += " (stopped early: rerun the same `dpd experts` command to train the rest)"
    if f["n_compatible"] != f["count"]:
        count += f" ({f['n_compatible']} usable, see the warnings)"
    acc = f["accuracy"]
    accuracy = ""
    if acc["mean"] is not None:
        accuracy = f"final test accuracy {_pct(acc['mean'])} mean (min {_pct(acc['min'])}, max {_pct(acc['max'])})"
    facts = [
        ("experts", count),
        ("dataset", f["dataset"] or "?"),
        ("model", (f["model_tag"] or "?") + (f", {f['n_params']:,} parameters" if f["n_params"] else "")),
        ("epochs", "" if f["epochs"] is None else str(f["epochs"])),
        ("training", training),
        ("accuracy", accuracy),
        ("imported", _imported(f["imported"]) if f.get("imported") else ""),
    ]
    _put(con, _facts_grid(facts))

    d = f["distance"]
    if d and d["values"]:
        v, n = d["values"], d["n_experts"]
        _heading(con, f"Parameter distance ‖θ(t) − θ(t+{d['m']})‖ per start epoch t (mean over {plural(n, 'expert')})")
        _put(con, f"{sparkline(v, 40)}  t=0: {_num(v[0])}, t={d['t'][-1]}: {_num(v[-1])}, max {_num(max(v))}")
        if d["n_experts_total"] > n:
            _put(con, f"Computed on the first {n} of {d['n_experts_total']} experts, to stay fast.", "dim")

    if f["experts"]:
        _heading(con, "Experts")
        rows = [
            (
                e["file"],
                str(e.get("epochs", "")),
                _pct(e.get("final_test_accuracy")) if e["valid"] else "",
                _status("INVALID" if not e["valid"] else "mismatch" if not e.get("compatible") else "ok"),
            )
            for e in f["experts"]
        ]
        _put(con, table(("file", ">epochs", ">final test acc", "status"), _cut(rows, _MAX_EXPERT_ROWS, "more")))
    _warnings(con, f["warnings"])


def _imported(record: dict) -> str:
    n = len(record["files"])
    text = f"from {n} replay buffer file{'s' if n != 1 else ''} ({record['format']})"
    if record["unknown"]:
        text += "; not recorded: " + ", ".join(k.replace("_", " ") for k in record["unknown"])
    return text


# --- export folder ----------------------------------------------------------------------------
def _show_export(con: Console, f: dict) -> None:
    _title(con, "Export folder", f["path"], f" (dpd export --format {f['format']})")
    shape = f", {_shape(f['image_shape'])}" if f["image_shape"] else ""
    images = f"{plural(f['n_images'] or 0, 'image')} ({f['ipc']} per class, {f['n_classes']} classes{shape})"
    facts = [
        ("dataset", (f["dataset"] or "?") + (", ZCA" if f["zca"] else "")),
        ("images", images + ("" if f["iteration"] is None else f", iteration {f['iteration']}")),
        ("labels", f["labels"]),
        ("model", f["model_tag"] or ""),
        ("source", f["source"] or "?"),
        ("written by", f"dpd {f['written_by']}" if f["written_by"] else "?"),
    ]
    _put(con, _facts_grid(facts))
    _files(con, f["files"], limit=_MAX_EXPERT_ROWS)  # one PNG per image: README and record stay in view
    _put(con, "README.txt says how to load them.", "dim")
    _warnings(con, f["warnings"])


# --- single file ------------------------------------------------------------------------------
#: Labels of a trajectory's or a preprocessing file's details (the others show under their key).
_DETAIL_LABELS = {
    "index": "expert",
    "n_params": "parameters",
    "final_test_accuracy": "final test acc",
    "model_tag": "model",
    "zca": "ZCA",
}
_CHECKSUM = {
    "verified": "verified (the tensor data is as written)",
    "mismatch": "DAMAGED (the tensor data does not match the checksum recorded when it was written)",
}


def _detail(key: str, value: Any) -> str:
    if value is None:
        return "?"
    if key == "final_test_accuracy":
        return _pct(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _show_file(con: Console, f: dict) -> None:
    _title(con, "File", f["path"], f" ({_size(f['size'])})")
    fmt = f["format"] or "a safetensors file not written by dpd (no dpd format metadata)"
    if f["format_version"]:
        fmt += f" version {f['format_version']}"
    part = f["part_of"]
    rows = [
        ("format", fmt),
        ("written by", f"dpd {f['written_by']}" if f["written_by"] else "?" if f["format"] else "another tool"),
        ("status", "valid" if f["valid"] else "INVALID: " + " ".join(f["problems"])),
        ("checksum", _CHECKSUM.get(f["checksum"], f["checksum"]) if f["format"] else ""),
    ]
    if part:
        what = "run" if part["kind"] == "run" else "experts folder"
        rows.append(("part of", f"{what} {part['path']} (`dpd inspect {part['path']}` shows all of it)"))
    d = f["details"] or {}
    synthetic = f["format"] in ("dpd.synthetic", "dpd.checkpoint") and d
    if synthetic:
        rows += [
            ("dataset", f"{d['dataset']}, {d['n_classes']} classes" + (", ZCA" if d["zca"] else "")),
            ("images", f"{d['n_images']} ({d['ipc']} per class, {_shape(d['image_shape'])})"),
            ("iteration", f"{d['iteration']} of {d['iterations']}"),
            ("α (lr)", _num(d["alpha"], 5)),
            ("labels", _labels_line(d)),
            ("model", d["model_tag"] or "?"),
        ]
    elif f["format"] != "dpd.prune_counts":  # prune counts get their table below
        rows += [(_DETAIL_LABELS.get(k, k), _detail(k, v)) for k, v in d.items()]
    _put(con, _facts_grid(rows))

    _heading(con, f"Tensors ({len(f['tensors'])})")
    rows = [(t["name"], t["dtype"], _shape(t["shape"]), _size(t["bytes"])) for t in f["tensors"]]
    _put(con, table(("name", "dtype", "shape", ">size"), rows))
    if f["metadata"]:
        _heading(con, "Metadata")
        texts = {
            k: v if isinstance(v, str) else json.dumps(v, separators=(", ", ": "), default=str)
            for k, v in f["metadata"].items()
        }
        rows = [(k, t if len(t) <= _META_WIDTH else t[: _META_WIDTH - 1] + "…") for k, t in sorted(texts.items())]
        _put(con, table(("key", "value"), rows))
        if any(len(t) > _META_WIDTH for t in texts.values()):
            _put(con, "Long values are cut (…); --json shows them in full.", "dim")
    if synthetic and d.get("soft_labels"):
        _soft_label_table(con, d["soft_labels"])
    if f["format"] == "dpd.prune_counts" and d:
        _prune_table(con, d)
    _evaluation(con, f["evaluation"])
    _warnings(con, f["warnings"])
