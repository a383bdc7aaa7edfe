"""The progress views and their words: Rich live views on a terminal, plain lines otherwise."""

from __future__ import annotations

import io
import re

from rich.console import Console

from dpd_cli import events as ev
from dpd_cli.cli import console
from tests.cli.conftest import DISTILL_TINY, TINY


def _terminal(width: int = 120) -> Console:
    return Console(width=width, record=True, file=io.StringIO(), force_terminal=True, color_system=None)


def test_the_distill_view_fits_120_columns_and_keeps_no_stale_time_left():
    con = _terminal()
    view = console._Distill(con, True)
    layers = [("conv1.weight", 3456), ("conv1.bias", 128), ("fc.weight", 20480)]
    rule = "global/abs/largest/step/loss"
    view.emit(
        ev.DistillStarted("runs/cifar10-ipc10-rho0.01-s0", 0, 5, layers, 24064, 100, 1, "cuda:0", "full", 0.01, rule)
    )
    for i in range(1, 6):
        view.emit(ev.CheckpointSaved(i, "ckpt")) if i == 5 else None
        view.emit(ev.DistillIteration(i, 5, 0.8123, 0.0123456, 19, [10, 1, 200], [10 * i, i, 200 * i], i, 0.3))
    view.close()
    lines = con.export_text().splitlines()
    assert "rho 0.01 (global/abs/largest/step/loss)   full memory" in lines  # on one line, not wrapped
    assert any(line.startswith("loss 0.8123  mean(last 5)") and line.endswith("checkpoint @ 5") for line in lines)
    (estimate,) = [line for line in lines if line.startswith("Estimated time for the whole job")]
    assert "left" not in estimate  # it stays on screen above the bars, which count the time down
    assert re.fullmatch(
        r"Estimated time for the whole job: about \d+ s \(5 iterations; at \S+ s each so far\)\.", estimate
    )


def test_one_of_a_kind_is_singular_in_the_views():
    con = _terminal()
    view = console._Experts(con, True)
    view.emit(ev.ExpertsStarted("ex", [0], 1, 1, 100, "cpu"))
    view.close()
    text = con.export_text()
    assert "Training 1 of 1 expert into ex" in text and "\n1 expert " in text
    con = _terminal()
    view = console._Evaluate(con, False)
    view.emit(ev.EvalStarted([("distilled", "convnet", 0, None)], 1, "cpu"))
    assert con.export_text().strip() == "evaluate: 1 training of 1 epoch on cpu"


def test_one_expert_one_network_in_words(dpd, tmp_path):
    r = dpd("experts", "--num", "1", "--epochs", "2", "--out", tmp_path / "ex", *TINY)
    assert r.exit_code == 0, r.output
    assert "experts: 1 to train of 1 in" in r.output and "1 expert in" in r.output
    r = dpd("distill", "--experts", tmp_path / "ex", "--out", tmp_path / "run", *DISTILL_TINY, "--threads", "1")
    assert r.exit_code == 0, r.output
    assert "1 expert, rho" in r.output
    r = dpd("evaluate", tmp_path / "run", "--runs", "1", "--epochs", "1", "--threads", "1")
    assert r.exit_code == 0, r.output
    assert "evaluate: 1 training of 2 epochs" in r.output and "(1 network)" in r.output and "± 0.00" not in r.output
    assert not re.search(r"\b1 (experts|trainings|networks|images|epochs)\b", r.output)
