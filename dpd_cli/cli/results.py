"""The evaluation results table, shared by ``dpd evaluate`` and ``dpd inspect``.

Rows are (model, protocol), columns are sources (distilled, initial images, random real, full data,
then any other source by name), and a cell is ``mean ± std (runs)`` in percent (``spread``), ``*`` marking diverged
trainings, ``†`` a distilled checkpoint selected on the test set (optimistic) and ``!`` a distilled set
below random real images by more than the spread, or whose distillation did not help (``no_gain``).
Entries are eval.json entries; ``inspect`` reads them leniently, so any number may be ``None``.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from dpd_cli.text import plural

__all__ = ["SOURCE_LABELS", "table", "results_table", "spread", "divergence_note", "selection_note", "below_note"]

SOURCE_LABELS = {"distilled": "distilled", "init": "initial images", "random": "random real", "full": "full data"}


def _label(source: str) -> str:
    return SOURCE_LABELS.get(source, str(source))


def pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.2f}"


def spread(mean: float | None, std: float | None, runs: int | None) -> str:
    """``57.32 ± 0.41 (5)`` in percent; one network has no spread: ``57.32 (1 network)``."""
    if runs == 1:
        return f"{pct(mean)} (1 network)"
    return f"{pct(mean)} ± {pct(std)} ({'?' if runs is None else runs})"


def table(headers: tuple[str, ...], rows: list[tuple]) -> Table:
    """A borderless table whose header starting with ">" is right-aligned. Cells are Text, not Rich markup:
    model names, sources, file names and metadata are data (a row of fewer cells ends with empty ones)."""
    t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", padding=(0, 1))
    for h in headers:
        right = h.startswith(">")
        t.add_column(h[1:] if right else h, justify="right" if right else "left", overflow="fold")
    for row in rows:
        t.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in row))
    return t


def marks(r: dict) -> str:
    """A cell's marks: ``*`` diverged trainings, ``†`` selected on the test set, ``!`` below the baselines or no gain."""
    flags = (r.get("diverged_runs"), r.get("optimistic"), r.get("below_baselines") or r.get("no_gain"))
    return "".join(mark for mark, on in zip("*†!", flags, strict=True) if on)


def results_table(results: list[dict]) -> Table:
    """The table of ``results`` (the latest entry wins where a model, protocol and source repeat)."""
    sources = [s for s in SOURCE_LABELS if any(r["source"] == s for r in results)]
    sources += sorted({str(r["source"]) for r in results} - set(sources))
    latest = {(r["model"], r.get("protocol"), str(r["source"])): r for r in results}
    rows = []
    for model, protocol in dict.fromkeys((r["model"], r.get("protocol")) for r in results):
        cells = [
            "" if r is None else spread(r.get("mean"), r.get("std"), r.get("runs")) + marks(r)
            for r in (latest.get((model, protocol, s)) for s in sources)
        ]
        rows.append((model, protocol, *cells))
    return table(("model", "protocol", *(">" + _label(s) for s in sources)), rows)


def divergence_note(results: list[dict]) -> str | None:
    """The note under the table on trainings whose loss became NaN/Inf (they count in the means)."""
    hit = [r for r in results if r.get("diverged_runs")]
    if not hit:
        return None
    n = sum(len(r["diverged_runs"]) for r in hit)
    total = sum(r.get("runs") or 0 for r in results)
    where = "; ".join(
        f"{_label(r['source'])} / {r['model']} run{'s' if len(r['diverged_runs']) > 1 else ''} "
        f"{', '.join(map(str, r['diverged_runs']))}" + ("" if r.get("lr") is None else f" (lr {r['lr']:.4g})")
        for r in hit
    )
    return (
        f"* {n} of {plural(total, 'training')} diverged (training loss became NaN/Inf): {where}. They count in the means at "
        "the accuracy they ended with. A lower learning rate usually trains them: rerun with a lower --lr than "
        "the one shown; networks without normalisation layers (alexnet) are the most sensitive."
    )


def selection_note(results: list[dict]) -> str | None:
    """Which checkpoint each distilled cell is, and how it was chosen (``†``: on the test set, optimistic)."""
    lines = []
    for r in results:
        if r["source"] != "distilled" or r.get("select") not in ("val", "test-max"):
            continue
        if r["select"] == "val":
            val = "" if r.get("val_accuracy") is None else f" ({pct(r['val_accuracy'])}%)"
            how = f"the best validation accuracy{val}"
        else:
            how = "† the best TEST accuracy: optimistic, selected on the test set as published tables are"
        its = [c.get("iteration") for c in r.get("checkpoints") or []]
        among = f" of {len(its)} ({', '.join(map(str, its))})" if its else ""
        final = "" if r.get("final_accuracy") is None else f"; the final set scores {pct(r['final_accuracy'])}%"
        chosen = f"checkpoint {r.get('selected_iteration')}{among}, chosen by {how}{final}"
        lines.append(f"{r['model']}: distilled = {chosen}.")
    return "\n".join(lines) or None


def below_note(results: list[dict]) -> str | None:
    """``!``: a distilled set below random real images by more than the spread, or whose distillation did not help."""
    lines = [
        f"! {r['model']}: the distilled set scores below {' and '.join(_label(b) for b in r['below_baselines'])} "
        "by more than the spread: distillation made these images worse (check --lr-img, --lr-teacher and the experts)."
        for r in results
        if r.get("below_baselines")
    ]
    lines += [f"! {r['no_gain']['message']}" for r in results if r.get("no_gain")]
    return "\n".join(lines) or None
