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
        {
            "source": "random",
            "model": "convnet",
            "protocol": "mtt",
            "mean": 0.41,
            "std": 0.008,
            "runs": 3,
            "diverged_runs": [2],
            "lr": 0.01,
        },
        {
            "source": "distilled",
            "model": "convnet",
            "protocol": "mtt",
            "mean": 0.7,
            "std": 0.01,
            "runs": 3,
            "diverged_runs": [],
        },
        {
            "source": "distilled",
            "model": "convnet",
            "protocol": "mtt",
            "mean": 0.71,
            "std": 0.0082,
            "runs": 3,
            "diverged_runs": [],
        },
        {
            "source": "other",
            "model": "vgg11",
            "protocol": "fixed",
            "mean": None,
            "std": None,
            "runs": None,
            "diverged_runs": [],
        },
    ]
    lines = _render(results_table(results))
    # Known sources first, in their order; others after them, by name. The latest entry of a cell wins.
    assert lines[0] == "model protocol distilled random real other"
    assert lines[1] == "convnet mtt 71.00 ± 0.82 (3) 41.00 ± 0.80 (3)*"
    assert lines[2] == "vgg11 fixed ? ± ? (?)"


def test_one_network_has_no_spread():
    one = {"source": "distilled", "model": "convnet", "protocol": "mtt", "mean": 0.221, "std": 0.0, "runs": 1}
    assert _render(results_table([one]))[1] == "convnet mtt 22.10 (1 network)"
    from dpd_cli.cli.ls import _accuracy  # dpd ls, and dpd compare's cells (spread)

    ev = {"mean": 0.221, "std": 0.0, "runs": 1, "model": "convnet", "select": None, "optimistic": False}
    assert _accuracy(ev) == "22.10 convnet (final, 1 network)"
    assert _accuracy({**ev, "runs": 3, "std": 0.01}) == "22.10 ± 1.00 convnet (final)"


def test_divergence_note():
    results = [
        {
            "source": "distilled",
            "model": "alexnet",
            "protocol": "mtt",
            "mean": 0.1,
            "std": 0.0,
            "runs": 2,
            "diverged_runs": [0, 1],
            "lr": 0.0129,
        },
        {
            "source": "full",
            "model": "alexnet",
            "protocol": "mtt",
            "mean": 0.8,
            "std": 0.0,
            "runs": 2,
            "diverged_runs": [],
            "lr": 0.01,
        },
        {
            "source": "random",
            "model": "alexnet",
            "protocol": "mtt",
            "mean": 0.1,
            "std": 0.0,
            "runs": 2,
            "diverged_runs": [1],
            "lr": None,
        },
    ]
    note = divergence_note(results)
    assert note.startswith(
        "* 3 of 6 trainings diverged (training loss became NaN/Inf): distilled / alexnet runs 0, 1 "
        "(lr 0.0129); random real / alexnet run 1. They count in the means"
    )
    assert divergence_note(results[1:2]) is None


def test_selection_marks_and_init_column():
    results = [
        {
            "source": "init",
            "model": "convnet",
            "protocol": "mtt",
            "mean": 0.8,
            "std": 0.01,
            "runs": 2,
            "diverged_runs": [],
        },
        {
            "source": "distilled",
            "model": "convnet",
            "protocol": "mtt",
            "mean": 0.7,
            "std": 0.01,
            "runs": 2,
            "diverged_runs": [],
            "select": "test-max",
            "optimistic": True,
            "selected_iteration": 100,
            "final_accuracy": 0.65,
            "checkpoints": [{"iteration": 0}, {"iteration": 100}, {"iteration": 200}],
            "below_baselines": ["init"],
        },
    ]
    lines = _render(results_table(results))
    assert lines[0] == "model protocol distilled initial images"
    assert lines[1] == "convnet mtt 70.00 ± 1.00 (2)†! 80.00 ± 1.00 (2)"
    from dpd_cli.cli.results import below_note, selection_note

    assert selection_note(results) == (
        "convnet: distilled = checkpoint 100 of 3 (0, 100, 200), chosen by † the best TEST "
        "accuracy: optimistic, selected on the test set as published tables are; the final "
        "set scores 65.00%."
    )
    assert below_note(results).startswith(
        "! convnet: the distilled set scores below initial images by more than the spread"
    )
