"""One module per file dpd writes: its names, its schema, a strict loader, a lenient check and its writer.

* ``experts`` -- an experts folder: ``experts.json``, ``preprocess.safetensors`` and the
  ``expert_NNNNN.safetensors`` trajectories (``ExpertSet`` reads them for ``dpd distill``);
* ``run`` -- the layout of a run directory, which checkpoints it keeps, and what its files say together;
* ``run_settings`` -- a run's ``settings.json``;
* ``synthetic`` -- ``synthetic.safetensors`` and ``checkpoints/ckpt-NNNNNN.safetensors``;
* ``preprocess`` -- ``preprocess.safetensors`` (of an experts folder or a run);
* ``metrics`` -- ``metrics.jsonl``;
* ``prune_counts`` -- ``prune_frequency.safetensors``;
* ``replay_buffer`` -- MTT / FTD / DATM ``replay_buffer_<n>.pt`` files, read by ``dpd experts import``;
* ``export`` -- the folders ``dpd export`` writes (MTT / DATM ``.pt`` files, PNGs, ``synthetic.npz``).
* ``evaluation`` -- ``eval.json`` and ``eval.partial.jsonl`` (``dpd evaluate``'s results);
* ``discover`` -- which folders are runs or experts folders, and finding them.

docs/formats.md describes every format for readers without dpd. Commands load files through these
modules only; ``dpd inspect`` and ``dpd ls`` use their lenient checks, which list problems instead of raising.
"""

import math
from pathlib import Path

__all__ = ["json_number", "json_int", "short_message"]


def json_number(x) -> float | None:
    """``x`` as a float for JSON output, or ``None`` for NaN, Inf and anything that is not a number (JSON has no NaN)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def json_int(x) -> int | None:
    """``x`` if it is a JSON integer (not a bool), else ``None``."""
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def short_message(message, path: Path, name: str | None = None) -> str:
    """``message`` with the (long) ``path`` written as ``name`` (default: the file's name)."""
    return str(message).replace(str(path), name or Path(path).name)
