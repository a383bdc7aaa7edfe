"""The results table ``dpd evaluate`` and ``dpd inspect`` share."""

from __future__ import annotations

from rich.console import Console

from dpd_cli.cli.results import divergence_note, results_table


def _render(table) -> list[str]:
    con = Console(width=100, record=True, color_system=None)
    con.print(table)
    return [" ".join(line.split()) for line in con.export_text().splitlines()]


def test_rows_columns_and_cells():
    results = [
        {"source": "random", "model": "convnet", "protocol": "mtt", "mean": 0.41, "std": 0.008, "runs": 3, "diverged_runs": [2], "lr": 0.01},
        {"source": "distilled", "model": "convnet", "protocol": "mtt", "mean": 0.7, "std": 0.01, "runs": 3, "diverged_runs": []},
        {"source": "distilled", "model": "convnet", "protocol": "mtt", "mean": 0.71, "std": 0.0082, "runs": 3, "diverged_runs": []},
        {"source": "init", "model": "vgg11", "protocol": "fixed", "mean": None, "std": None, "runs": None, "diverged_runs": []},
    ]
    lines = _render(results_table(results))
    # Known sources first, in their order; others after them, by name. The latest entry of a cell wins.
    assert lines[0] == "model protocol distilled random real init"
    assert lines[1] == "convnet mtt 71.00 ± 0.82 (3) 41.00 ± 0.80 (3)*"
    assert lines[2] == "vgg11 fixed ? ± ? (?)"


def test_divergence_note():
    results = [
        {"source": "distilled", "model": "alexnet", "protocol": "mtt", "mean": 0.1, "std": 0.0, "runs": 2, "diverged_runs": [0, 1], "lr": 0.0129},
        {"source": "full", "model": "alexnet", "protocol": "mtt", "mean": 0.8, "std": 0.0, "runs": 2, "diverged_runs": [], "lr": 0.01},
        {"source": "random", "model": "alexnet", "protocol": "mtt", "mean": 0.1, "std": 0.0, "runs": 2, "diverged_runs": [1], "lr": None},
    ]
    note = divergence_note(results)
    assert note.startswith("* 3 of 6 trainings diverged (training loss became NaN/Inf): distilled / alexnet runs 0, 1 "
                           "(lr 0.0129); random real / alexnet run 1. They count in the means")
    assert divergence_note(results[1:2]) is None
