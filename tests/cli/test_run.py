"""``dpd run CONFIG``: the four commands in one, continuing what an earlier call left."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from dpd_cli.artifacts import layout
from dpd_cli.core import matching
from tests.cli.conftest import DISTILL_TINY, TINY
from tests.cli.test_interrupts import Zygote, _sigint_in_step, same_result, wait_for


def _table(flags: list[str]) -> str:
    """``--name value`` pairs as TOML lines."""
    return "".join(f"{flags[i][2:].replace('-', '_')} = {flags[i + 1]}\n" for i in range(0, len(flags), 2))


#: TINY and DISTILL_TINY as a config file; on the CPU, where resumes are bit-identical.
CONFIG = (
    _table(TINY)
    + 'device = "cpu"\n\n[experts]\nnum = 2\nepochs = 3\n\n[distill]\n'
    + _table(DISTILL_TINY)
    + 'out = "runs/tiny"\n\n[evaluate]\nepochs = 3\nruns = 2\nbaseline = ["random"]\n'
)


@pytest.fixture
def place(tmp_path, monkeypatch):
    """``place(name)``: a fresh folder holding tiny.toml, made the current folder with its own experts root."""

    def make(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "tiny.toml").write_text(CONFIG)
        monkeypatch.chdir(folder)
        monkeypatch.setenv("DPD_EXPERTS_ROOT", str(folder / "experts-root"))
        return folder

    return make


def _mtimes(*folders: Path) -> dict:
    return {
        p: p.stat().st_mtime_ns for f in folders for p in f.rglob("*") if p.is_file() and not p.name.startswith(".")
    }


def _means(folder: Path) -> list:
    return [(e["source"], e["accuracies"]) for e in json.loads((folder / "runs/tiny/eval.json").read_text())["results"]]


def test_run_does_the_four_steps_then_a_rerun_does_nothing(dpd, place):
    here = place("a")
    r = dpd("run", "tiny.toml")
    assert r.exit_code == 0, r.output
    (experts,) = (here / "experts-root").glob("*/*")
    assert len(list(experts.glob("expert_*.safetensors"))) == 2
    run = here / "runs/tiny"
    assert (run / "synthetic.safetensors").is_file() and (run / "eval.json").is_file()
    assert "Run directory runs/tiny" in r.output and "state    finished (4/4 iterations)" in r.output
    assert "distilled       random real" in r.output  # the evaluation, in the inspect summary
    assert "experts   ran" in r.output and "distill   ran" in r.output and "evaluate  ran" in r.output

    before = _mtimes(experts, run)
    r = dpd("run", "tiny.toml", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["command"] == "run"
    assert {k: out[k]["status"] for k in ("experts", "distill", "evaluate")} == dict.fromkeys(
        ("experts", "distill", "evaluate"), "skipped"
    )
    assert (out["distill"]["path"], out["evaluate"]["path"]) == ("runs/tiny", "runs/tiny/eval.json")
    assert [(e["source"], e["accuracies"]) for e in out["results"]] == _means(here)
    assert len(json.loads((run / "eval.json").read_text())["results"]) == 2  # nothing appended
    assert _mtimes(experts, run) == before  # nothing rewritten

    # A changed evaluation setting evaluates again (and --fail-under's exit code is evaluate's);
    # a changed distillation setting is refused, as --resume refuses it.
    (here / "tiny.toml").write_text(CONFIG.replace("runs = 2", "runs = 1\nfail_under = 99"))
    r = dpd("run", "tiny.toml", "--quiet")
    assert r.exit_code == 3 and r.stdout == "" and "reached" in r.stderr and "< --fail-under 99%" in r.stderr
    assert len(json.loads((run / "eval.json").read_text())["results"]) == 4
    (here / "tiny.toml").write_text(CONFIG.replace("syn_steps = 3", "syn_steps = 2"))
    r = dpd("run", "tiny.toml")
    assert r.exit_code == 2 and "--syn-steps: the run has 3, settings give 2" in r.output, r.output
    assert "Traceback" not in r.output


def test_run_gives_what_the_four_commands_give(dpd, place):
    apart = place("apart")
    for args in (["experts"], ["distill"], ["evaluate", "runs/tiny"]):
        r = dpd(*args, "-c", "tiny.toml")
        assert r.exit_code == 0, r.output
    together = place("together")
    assert dpd("run", "tiny.toml").exit_code == 0
    same_result(apart / "runs/tiny", together / "runs/tiny")
    assert _means(apart) == _means(together)


def test_ctrl_c_in_distill_then_rerun_resumes(dpd, place, monkeypatch):
    whole = place("whole")
    assert dpd("run", "tiny.toml", "--quiet").exit_code == 0
    stopped = place("stopped")
    real = matching.meta_gradient
    _sigint_in_step(monkeypatch, 3, 1)
    r = dpd("run", "tiny.toml", "--quiet")
    assert r.exit_code == 130, r.output
    assert "Interrupted: distill: stopped after iteration 3; rerun the same `dpd run` to continue" in r.output
    assert not (stopped / "runs/tiny/eval.json").exists()
    monkeypatch.setattr(matching, "meta_gradient", real)
    r = dpd("run", "tiny.toml", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [out[k]["status"] for k in ("experts", "distill", "evaluate")] == ["skipped", "resumed", "ran"]
    same_result(whole / "runs/tiny", stopped / "runs/tiny")
    assert _means(whole) == _means(stopped)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses fork and POSIX signals")
def test_sigint_to_a_real_process_then_rerun_equals_an_uninterrupted_run(dpd, place):
    zygote = Zygote(Path.cwd())  # imports torch while the uninterrupted run goes
    try:
        whole = place("whole")
        assert dpd("run", "tiny.toml", "--quiet").exit_code == 0
        stopped = place("stopped")
        env = {k: os.environ[k] for k in ("NO_COLOR", "COLUMNS", "DPD_EXPERTS_ROOT", "DPD_DATA_ROOT", "DPD_CACHE_ROOT")}
        child = zygote.start(["run", "tiny.toml"], stopped, env | {"DPD_DEBUG": ""})
        wait_for(lambda: any((stopped / "experts-root").glob("*/*/expert_00000.safetensors")), child, timeout=300)
        child.signal(signal.SIGINT)
        assert child.wait(60) == 130, child.stderr
        assert "Interrupted" in child.stderr and "rerun the same" in child.stderr and "Traceback" not in child.stderr
    finally:
        zygote.close()
    assert not (stopped / "runs/tiny" / layout.EVAL).exists()
    r = dpd("run", "tiny.toml")
    assert r.exit_code == 0, r.output
    same_result(whole / "runs/tiny", stopped / "runs/tiny")
    assert _means(whole) == _means(stopped)
