"""dpd distill --seeds: K runs as one batched computation, each run directory as a separate --seed run's."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from dpd_cli.artifacts import layout
from dpd_cli.artifacts.synthetic import load as load_synthetic
from dpd_cli.core import matching
from dpd_cli.io import storage
from tests.cli.conftest import DISTILL_TINY, TINY


def _distill(dpd, experts, *args):
    r = dpd("distill", "--experts", experts, *DISTILL_TINY, *TINY, *args)
    assert r.exit_code == 0, r.output
    return r


def _close(a: Path, b: Path) -> None:
    """Two run directories hold the same run up to float32 rounding (and the same choices exactly)."""
    ta, ma = load_synthetic(a / "synthetic.safetensors")
    tb, mb = load_synthetic(b / "synthetic.safetensors")
    assert torch.equal(ta["labels"], tb["labels"]) and ma["iteration"] == mb["iteration"]
    for k in ("images", "lr") + (("label_logits",) if "label_logits" in tb else ()):
        assert torch.allclose(ta[k], tb[k], rtol=1e-5, atol=1e-6), k
    pa, _ = storage.load_tensors(a / "prune_frequency.safetensors")
    pb, _ = storage.load_tensors(b / "prune_frequency.safetensors")
    assert torch.equal(pa["counts"], pb["counts"])
    ra, rb = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b))
    assert [{k: v for k, v in x.items() if k not in ("seconds", "loss", "lr")} for x in ra] == [
        {k: v for k, v in x.items() if k not in ("seconds", "loss", "lr")} for x in rb
    ]
    assert [x["loss"] for x in ra] == pytest.approx([x["loss"] for x in rb], rel=1e-5)
    sa, sb = (json.loads((r / layout.SETTINGS).read_text()) for r in (a, b))
    same = {"out": None, "iterations": None}  # as settings.json recorded them at the start
    assert {**sa, "settings": {**sa["settings"], **same}} == {**sb, "settings": {**sb["settings"], **same}}


@pytest.mark.parametrize(
    "flags",
    [[], ["--memory", "low", "--soft-labels", "--prune-mode", "network"], ["--batch-syn", "4", "--prune-mask", "ema"]],
    ids=["default", "low-soft-network", "batches-ema"],
)
def test_each_seed_writes_the_run_a_separate_seed_run_writes(dpd, experts, tmp_path, flags):
    r = _distill(dpd, experts, "--seeds", "0,1", "--out", tmp_path / "b", *flags)
    assert "2 runs in one batch" in r.output and "Next: dpd evaluate" in r.output
    for seed in (0, 1):
        _distill(dpd, experts, "--seed", seed, "--out", tmp_path / f"one-s{seed}", *flags)
        _close(tmp_path / f"b-s{seed}", tmp_path / f"one-s{seed}")
        shown = dpd("inspect", tmp_path / f"b-s{seed}")
        assert shown.exit_code == 0, shown.output
        assert f"seed {seed}" in shown.output and "finished (4/4 iterations)" in shown.output


def test_without_out_each_run_goes_to_its_seeds_default_directory(dpd, experts, tmp_path):
    r = _distill(dpd, experts, "--seeds", "2,0", "--iterations", "1", "--json")
    dirs = [Path(d["run_dir"]).name for d in json.loads(r.stdout)["runs"]]
    assert dirs == ["fashion-mnist-mini-ipc1-rho0.01-s2", "fashion-mnist-mini-ipc1-rho0.01-s0"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(dirs)


def test_the_batch_resumes_after_ctrl_c_as_if_uninterrupted(dpd, experts, tmp_path, monkeypatch):
    _distill(dpd, experts, "--seeds", "0,1", "--out", tmp_path / "full", "--iterations", "5")
    real, calls = matching.meta_gradient, []

    def sigint_in_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        return real(*a, **k)

    monkeypatch.setattr(matching, "meta_gradient", sigint_in_step_3)
    part = tmp_path / "part"
    r = dpd("distill", "--experts", experts, *DISTILL_TINY, *TINY, "--seeds", "0,1", "--out", part, "--iterations", "5")
    assert r.exit_code == 130, r.output
    assert f"stopped after iteration 3; rerun the same command with --resume to continue {part}-s0, {part}-s1" in (
        " ".join(r.output.split())
    )
    monkeypatch.setattr(matching, "meta_gradient", real)
    for seed in (0, 1):
        assert layout.checkpoints(Path(f"{part}-s{seed}"))[0].name == "ckpt-000003.safetensors"
    _distill(dpd, experts, "--seeds", "0,1", "--out", part, "--iterations", "5", "--resume")
    for seed in (0, 1):
        a, _ = load_synthetic(Path(f"{part}-s{seed}") / "synthetic.safetensors")
        b, _ = load_synthetic(tmp_path / f"full-s{seed}" / "synthetic.safetensors")
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["lr"], b["lr"])


def test_runs_at_different_iterations_are_refused_together_and_resume_alone(dpd, experts, tmp_path):
    _distill(dpd, experts, "--seeds", "0,1", "--out", tmp_path / "b", "--iterations", "2")
    _distill(dpd, experts, "--seed", "1", "--out", tmp_path / "b-s1", "--iterations", "4", "--resume")  # a plain run
    r = dpd(
        "distill", "--experts", experts, *DISTILL_TINY, *TINY, "--seeds", "0,1", "--out", tmp_path / "b", "--resume"
    )
    assert r.exit_code != 0
    text = " ".join(r.output.split())
    assert "stopped at different iterations" in text and "at iteration 2" in text and "at iteration 4" in text
    _distill(dpd, experts, "--seed", "0", "--out", tmp_path / "b-s0", "--resume")
    _distill(dpd, experts, "--seed", "1", "--out", tmp_path / "one-s1")
    _close(tmp_path / "b-s1", tmp_path / "one-s1")


def test_seeds_must_be_distinct(dpd):
    r = dpd("distill", "--seeds", "1,1")
    assert r.exit_code != 0 and "distinct seeds" in " ".join(r.output.split())


def test_seeds_are_refused_under_torchrun(dpd, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = dpd("distill", "--seeds", "0,1")
    assert r.exit_code == 2 and "--seeds runs on one process" in " ".join(r.output.split())
