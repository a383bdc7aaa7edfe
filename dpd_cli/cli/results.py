"""The evaluation results table, shared by ``dpd evaluate`` and ``dpd inspect``.

Rows are (model, protocol), columns are sources (distilled, random real, full data, then any other
source by name), and a cell is ``mean ± std (runs)`` in percent, ``*`` marking diverged trainings.
Entries are eval.json entries; ``inspect`` reads them leniently, so any number may be ``None``.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

__all__ = ["SOURCE_LABELS", "results_table", "divergence_note"]

SOURCE_LABELS = {"distilled": "distilled", "random": "random real", "full": "full data"}


def _label(source: str) -> str:
    return SOURCE_LABELS.get(source, str(source))


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.2f}"


def results_table(results: list[dict]) -> Table:
    """The table of ``results`` (the latest entry wins where a model, protocol and source repeat)."""
    sources = [s for s in SOURCE_LABELS if any(r["source"] == s for r in results)]
    sources += sorted({str(r["source"]) for r in results} - set(sources))
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", padding=(0, 1))
    for name, justify in (("model", "left"), ("protocol", "left"), *[(_label(s), "right") for s in sources]):
        table.add_column(name, justify=justify, overflow="fold")
    for model, protocol in dict.fromkeys((r["model"], r.get("protocol")) for r in results):
        cells = []
        for s in sources:
            hit = [r for r in results if (r["model"], r.get("protocol"), str(r["source"])) == (model, protocol, s)]
            if hit:
                r = hit[-1]
                runs = "?" if r.get("runs") is None else r["runs"]
                cells.append(f"{_pct(r.get('mean'))} ± {_pct(r.get('std'))} ({runs}){'*' if r.get('diverged_runs') else ''}")
            else:
                cells.append("")
        # Text cells: model names and sources are data, not Rich markup.
        table.add_row(*(Text(str(c)) for c in (model, protocol, *cells)))
    return table


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
    return (f"* {n} of {total} trainings diverged (training loss became NaN/Inf): {where}. They count in the means at "
            "the accuracy they ended with. A lower learning rate usually trains them: rerun with a lower --lr than "
            "the one shown; networks without normalisation layers (alexnet) are the most sensitive.")
