"""K runs as one batched computation (``BatchRecipe``: ``dpd distill --seeds``, ``dpd study --concurrent``), each
run directory as a separate run's."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from dpd_cli.artifacts import layout
from dpd_cli.artifacts.synthetic import load as load_synthetic
from dpd_cli.config.settings import DistillSettings
from dpd_cli.core import matching
from dpd_cli.errors import SettingsError
from dpd_cli.io import storage
from dpd_cli.recipes import distill_inputs
from dpd_cli.recipes.batch import BatchRecipe
from dpd_cli.recipes.distill import DistillRecipe
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
    rounded = ("seconds", "loss", "lr", "grad_norm")
    assert [{k: v for k, v in x.items() if k not in rounded} for x in ra] == [
        {k: v for k, v in x.items() if k not in rounded} for x in rb
    ]
    for k in ("loss", "grad_norm"):
        assert [x[k] for x in ra] == pytest.approx([x[k] for x in rb], rel=1e-5), k
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


def _settings(experts, out, **flags) -> DistillSettings:
    tiny = {"ipc": 1, "iterations": 5, "syn_steps": 3, "max_start_epoch": 2, "expert_epochs": 1, "lr_img": 10.0}
    tiny |= {"lr_lr": 1e-6, "width": 8, "depth": 2, "train_per_class": 20, "threads": 1, "log_every": 100}
    return DistillSettings.model_validate({**tiny, "experts": experts, "out": out, **flags})


def _in_float64(recipe: DistillRecipe) -> None:
    st = recipe.state
    for name in ("images", "lr", "momentum_images", "momentum_lr", "label_logits", "momentum_labels"):
        if getattr(st, name) is not None:
            setattr(st, name, getattr(st, name).double())


#: Variants in one batch: rho 0 (MTT) with a warm-up of the image step, 0.05 with a clipped image gradient,
#: another criterion, direction and step size, network mode with an EMA mask, and a prune warm-up with another
#: seed and expert epochs. (Not --prune-scope layer here: the conv biases, which instance norm leaves without a
#: gradient, tie at 0 up to rounding, and a tie may go either way.)
VARIANTS = [
    {"prune_ratio": 0.0, "lr_img_warmup": 3},
    {"prune_ratio": 0.05, "clip_img": 1e-3},
    {"prune_ratio": 0.05, "prune_criterion": "relative", "prune_direction": "smallest", "lr_img": 3.0},
    {"prune_ratio": 0.1, "prune_mode": "network", "prune_mask": "ema"},
    {"prune_ratio": 0.05, "prune_warmup": 2, "expert_epochs": 2, "seed": 1},
]


@pytest.mark.parametrize(
    "shared", [{}, {"memory": "low", "soft_labels": True, "batch_syn": 1}], ids=["full", "low-soft-batches"]
)
def test_a_batch_of_variants_computes_what_each_variant_computes_alone_in_float64(
    experts, tmp_path, monkeypatch, shared
):
    """Each member its own prune ratio, criterion, mask and step size: 1e-10 in float64 after 4 iterations."""
    monkeypatch.setattr(distill_inputs, "to_device", lambda t, device: t.to(device, torch.float64))
    runs = [_settings(experts, tmp_path / f"b{k}", **shared, **v) for k, v in enumerate(VARIANTS)]
    with BatchRecipe(runs, None, DistillRecipe) as b:
        for r in b.runs:
            _in_float64(r)
        for _ in range(4):
            b.step()
        together = [r.state for r in b.runs]
        assert all(p["grad_norm"] > VARIANTS[1]["clip_img"] for p in b.runs[1]._pending)  # the clip bites
    for k, s in enumerate(runs):
        with DistillRecipe(s.model_copy(update={"out": tmp_path / f"one{k}"})) as one:
            _in_float64(one)
            for _ in range(4):
                one.step()
            alone, mine = one.state, together[k]
            for name in ("images", "lr", "label_logits", "prune_state"):
                if getattr(alone, name) is not None:
                    torch.testing.assert_close(getattr(mine, name), getattr(alone, name), rtol=1e-10, atol=1e-10)
            assert torch.equal(mine.prune_counts, alone.prune_counts), k
    assert [int(t.prune_counts.sum() > 0) for t in together] == [0, 1, 1, 1, 1]


def test_runs_that_differ_in_the_shared_computation_are_refused(experts, tmp_path):
    runs = [_settings(experts, tmp_path / "a"), _settings(experts, tmp_path / "b", ipc=2, memory="low")]
    with pytest.raises(SettingsError) as e:
        BatchRecipe(runs, None, DistillRecipe)
    assert str(e.value) == (
        f"{tmp_path / 'b'} cannot join {tmp_path / 'a'} in one batch: they differ in --ipc (2 against 1), --memory "
        "('low' against 'full'). Runs batched together may differ only in their seed, output, learning rates, "
        "initial images and prune settings; run the others separately."
    )


def test_a_member_that_diverges_drops_out_and_the_others_finish(experts, tmp_path):
    steady = {"lr_lr": 1e-8, "log_every": 1}  # alpha stays positive
    runs = [
        _settings(experts, tmp_path / "ok", **steady),
        _settings(experts, tmp_path / "bad", **steady, lr_img=math.inf),
    ]
    with BatchRecipe(runs, None, DistillRecipe) as b:
        ok, bad = b.train(keep_going=True)
    assert ok == tmp_path / "ok" and "Distillation diverged at iteration 2" in str(bad)
    with DistillRecipe(_settings(experts, tmp_path / "alone", **steady)) as one:
        one.train()
    _close(tmp_path / "ok", tmp_path / "alone")
    assert [p.name for p in layout.checkpoints(tmp_path / "bad")] == ["ckpt-000000.safetensors"]
