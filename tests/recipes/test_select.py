"""``dpd evaluate --select``: every kept checkpoint trained on, the best by validation (or test) accuracy reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dpd_cli import interrupt
from dpd_cli.artifacts import layout
from dpd_cli.artifacts.synthetic import load as load_synthetic
from dpd_cli.config.settings import resolve
from dpd_cli.errors import SettingsError, StorageError
from dpd_cli.recipes import evaluate as E

_TINY = {"width": 4, "depth": 2, "train_per_class": 20, "threads": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two finished 6-iteration runs keeping every checkpoint: one with a validation split, one without."""
    from dpd_cli.recipes import distill, experts

    tmp = tmp_path_factory.mktemp("select")
    common = {
        "ipc": 1,
        "iterations": 6,
        "syn_steps": 2,
        "max_start_epoch": 1,
        "expert_epochs": 1,
        "lr_img": 10,
        "lr_lr": 1e-8,
        "checkpoint_every": 2,
        "keep_checkpoints": "all",
    }
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (
            ("DPD_EXPERTS_ROOT", "experts-root"),
            ("DPD_DATA_ROOT", "data-root"),
            ("DPD_CACHE_ROOT", "cache-root"),
        ):
            mp.setenv(var, str(tmp / sub))
        for name, val in (("val", 5), ("noval", None)):
            extra = {"val_per_class": val} if val else {}
            experts.run(
                resolve("experts", {**_TINY, **extra, "num": 1, "epochs": 2, "dsa": False, "out": tmp / f"ex-{name}"})
            )
            distill.run(
                resolve("distill", {**_TINY, **extra, **common, "experts": tmp / f"ex-{name}", "out": tmp / name})
            )
    return {"val": tmp / "val", "noval": tmp / "noval"}


@pytest.fixture
def run_val(runs, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(runs["val"], run, ignore=shutil.ignore_patterns(".*lock*"))
    return run


def _settings(**flags):
    return resolve("evaluate", {"epochs": 1, "runs": 2, "threads": 1, **flags})


def _scripted(monkeypatch, table: dict) -> list[dict]:
    """Trainings replaced by a table: (source, checkpoint iteration or None) -> (test, val) accuracy; a list of test
    accuracies gives one per network (in the order of their seeds' first use)."""
    calls: list[dict] = []
    seeds: list[int] = []

    def fake(spec, xs, ys, x_test, y_test, epochs, lrs, s, seeds_, device, on_epoch, x_val=None, y_val=None):
        out = []
        for x, lr, seed in zip(xs, lrs, seeds_, strict=True):
            key = next(k for k, ref in refs.items() if ref is not None and torch.equal(ref, x))
            calls.append({"key": key, "lr": lr, "seed": seed, "x_val": x_val, "y_val": y_val})
            seeds.extend([seed] if seed not in seeds else [])
            test, val = table[key]
            out.append(E.TrainResult(test[seeds.index(seed)] if isinstance(test, list) else test, None, val))
        return out

    refs: dict = {}
    monkeypatch.setattr(E, "_train_and_test", fake)
    return calls, refs


def _register(refs: dict, run: Path) -> None:
    for p in layout.checkpoints(run):
        refs[("distilled", layout.checkpoint_iteration(p))] = load_synthetic(p)[0]["images"]


def test_checkpoint_0_and_every_kept_one_are_candidates(run_val, monkeypatch):
    calls, refs = _scripted(
        monkeypatch, {("distilled", i): (0.5 + i / 100, 0.9 - abs(i - 2) / 10) for i in range(0, 7, 2)}
    )
    _register(refs, run_val)
    result = E.run(_settings(), run_val)  # default: val, since the run has a split and several checkpoints
    (entry,) = result["results"]
    assert entry["select"] == "val" and entry["selected_iteration"] == 2  # best validation accuracy (0.9)
    assert entry["mean"] == pytest.approx(0.52) and entry["val_accuracy"] == pytest.approx(0.9)  # its *test* accuracy
    assert entry["final_accuracy"] == pytest.approx(0.56) and not entry["optimistic"]
    assert [c["iteration"] for c in entry["checkpoints"]] == [0, 2, 4, 6]
    assert sorted({c["key"][1] for c in calls}) == [0, 2, 4, 6] and len(calls) == 8  # 2 networks per checkpoint
    # The same network seeds for every checkpoint (paired), and each at its own learned step size.
    seeds = {}
    for c in calls:
        seeds.setdefault(c["key"][1], []).append(c["seed"])
    assert len({tuple(v) for v in seeds.values()}) == 1
    for p in layout.checkpoints(run_val):
        it = layout.checkpoint_iteration(p)
        assert {c["lr"] for c in calls if c["key"][1] == it} == {float(load_synthetic(p)[0]["lr"])}
    # The validation images are the held-out real training images, never the test set.
    assert calls[0]["x_val"] is not None and len(calls[0]["y_val"]) == 5 * 10
    stored = json.loads((run_val / "eval.json").read_text())["results"][-1]
    assert stored["select"] == "val" and stored["selected_iteration"] == 2


def test_checkpoint_0_wins_when_distillation_hurt(run_val, monkeypatch):
    calls, refs = _scripted(monkeypatch, {("distilled", i): (0.8 - i / 100, 0.8 - i / 100) for i in range(0, 7, 2)})
    _register(refs, run_val)
    entry = E.run(_settings(select="val"), run_val)["results"][0]
    assert entry["selected_iteration"] == 0 and entry["mean"] == pytest.approx(0.8)


def test_test_max_is_labelled_optimistic_and_final_is_the_last(run_val, monkeypatch):
    table = {("distilled", i): (t, v) for i, t, v in ((0, 0.3, 0.9), (2, 0.7, 0.1), (4, 0.5, 0.2), (6, 0.4, 0.3))}
    calls, refs = _scripted(monkeypatch, table)
    _register(refs, run_val)
    tmax = E.run(_settings(select="test-max"), run_val)["results"][0]
    assert tmax["selected_iteration"] == 2 and tmax["mean"] == pytest.approx(0.7) and tmax["optimistic"]
    final = E.run(_settings(select="final"), run_val)["results"][0]
    assert final["selected_iteration"] == 6 and final["mean"] == pytest.approx(0.4) and "checkpoints" not in final
    val = E.run(_settings(select="val"), run_val)["results"][0]
    assert val["selected_iteration"] == 0 and val["mean"] == pytest.approx(0.3)


def test_init_baseline_and_the_warning(run_val, monkeypatch):
    calls, refs = _scripted(monkeypatch, {("distilled", 6): (0.60, None), ("init", 0): (0.75, None)})
    refs[("distilled", 6)] = load_synthetic(run_val / "synthetic.safetensors")[0]["images"]
    refs[("init", 0)] = load_synthetic(layout.checkpoint_path(run_val, 0))[0]["images"]
    result = E.run(_settings(select="final", baseline=["init"]), run_val)
    d, init = result["results"]
    assert init["source"] == "init" and init["iteration"] == 0
    final_lr = float(load_synthetic(run_val / "synthetic.safetensors")[0]["lr"])
    assert {c["lr"] for c in calls} == {final_lr}  # the initial images train at the final learned step size
    assert [c["seed"] for c in calls if c["key"][0] == "distilled"] == [
        c["seed"] for c in calls if c["key"][0] == "init"
    ]
    # Against its own initial images the final set is compared network by network (no_gain), not as a baseline.
    assert "below_baselines" not in d and d["no_gain"]["reason"] == "final_below_initial"
    (warning,) = result["warnings"]
    assert "the final set scores below its own initial images (checkpoint 0) beyond noise" in warning
    assert "Test accuracy (%) by iteration: 0: 75.00, 6: 60.00 (final minus initial -15.00 points over 2" in warning


def _curve(test: dict, val: dict) -> dict:
    return {("distilled", i): (test[i], val[i]) for i in test}


def test_no_gain_when_selection_returns_the_initial_images(run_val, monkeypatch):
    # The failure case of a too-large image step: the initial images (checkpoint 0) beat every distilled checkpoint.
    test = {0: 0.916, 2: 0.611, 4: 0.696, 6: 0.805}
    calls, refs = _scripted(monkeypatch, _curve(test, {0: 0.9, 2: 0.6, 4: 0.7, 6: 0.8}))
    _register(refs, run_val)
    result = E.run(_settings(select="val"), run_val)
    d = result["results"][0]
    assert d["selected_iteration"] == 0 and d["mean"] == pytest.approx(0.916)
    ng = d["no_gain"]
    assert (ng["reason"], ng["selected_iteration"], ng["final_iteration"]) == ("selected_initial", 0, 6)
    assert (ng["initial"], ng["final"]) == (pytest.approx(0.916), pytest.approx(0.805))
    assert [(c["iteration"], c["mean"]) for c in ng["curve"]] == [(i, pytest.approx(a)) for i, a in test.items()]
    assert ng["difference"]["mean"] == pytest.approx(-0.111) and ng["difference"]["n"] == 2
    assert (
        "--select val chose checkpoint 0, the untouched initial images: the 91.60% reported is theirs" in ng["message"]
    )
    assert "Test accuracy (%) by iteration: 0: 91.60, 2: 61.10, 4: 69.60, 6: 80.50" in ng["message"]
    assert (
        "try a smaller --lr-img (e.g. 1, a tenth of this run's 10); DPD pruning (--prune-ratio 0.01 or 0.05) or "
        "--clip-img kept" in ng["message"]
    )
    assert result["warnings"] == [ng["message"]] and result["no_gain"] == ["convnet"] and result["passed"]
    assert json.loads((run_val / "eval.json").read_text())["results"][-1]["no_gain"] == ng
    assert not E.run(_settings(select="val", fail_if_no_gain=True), run_val)["passed"]


def test_no_gain_when_the_final_set_is_below_the_initial_images_beyond_noise(run_val, monkeypatch):
    val = {0: 0.5, 2: 0.9, 4: 0.6, 6: 0.6}  # validation picks checkpoint 2, not 0
    initial, final = [0.80, 0.81], [0.70, 0.72]
    calls, refs = _scripted(monkeypatch, _curve({0: initial, 2: [0.85, 0.86], 4: 0.7, 6: final}, val))
    _register(refs, run_val)
    d = E.run(_settings(select="val"), run_val)["results"][0]
    assert d["selected_iteration"] == 2 and d["no_gain"]["reason"] == "final_below_initial"
    lo, hi = d["no_gain"]["difference"]["ci95"]
    assert hi < 0 and lo < -0.095 < hi  # -0.095 ± t(0.975, 1) · sd / √2
    # Within the networks' spread it is noise: no warning, and --fail-if-no-gain passes.
    calls, refs = _scripted(monkeypatch, _curve({0: initial, 2: [0.85, 0.86], 4: 0.7, 6: [0.70, 0.90]}, val))
    _register(refs, run_val)
    result = E.run(_settings(select="val", fail_if_no_gain=True), run_val)
    assert "no_gain" not in result["results"][0] and result["passed"] and result["warnings"] == []


def test_selection_trainings_resume(run_val, monkeypatch):
    calls, refs = _scripted(monkeypatch, {("distilled", i): (0.5, 0.5) for i in range(0, 7, 2)})
    _register(refs, run_val)
    real = E._train_and_test

    def stops_after_three(*a, **k):
        if len(calls) == 3:
            raise interrupt.Interrupted("test")
        return real(*a, **k)

    monkeypatch.setattr(E, "_train_and_test", stops_after_three)
    with pytest.raises(interrupt.Interrupted):
        E.run(_settings(select="val", concurrent=1), run_val)
    assert len(calls) == 3
    monkeypatch.setattr(E, "_train_and_test", real)
    E.run(_settings(select="val", concurrent=4), run_val)  # in groups now: finished trainings are reused all the same
    assert len(calls) == 8  # 3 reused from the partial file, 5 trained now
    assert not (run_val / "eval.partial.jsonl").exists()


def test_bad_selections(runs, tmp_path):
    with pytest.raises(
        SettingsError, match="--select val needs a validation split, and .* has none. Train experts and distil with"
    ):
        E.run(_settings(select="val"), runs["noval"])
    single = tmp_path / "one"
    shutil.copytree(runs["val"], single, ignore=shutil.ignore_patterns(".*lock*"))
    for p in layout.checkpoints(single)[1:]:
        p.unlink()
    with pytest.raises(SettingsError, match="keeps 1. Distil with --keep-checkpoints all"):
        E.run(_settings(select="test-max"), single)
    with pytest.raises(SettingsError, match="give the run directory, not a single file"):
        E.run(_settings(select="val"), single / "synthetic.safetensors")
    # Without a split the default is the final set, and only it is trained.
    assert E._choose_select(_settings(), runs["noval"], layout.checkpoints(runs["noval"]), False) == "final"
    with pytest.raises(StorageError, match="is an experts folder"):
        E.run(_settings(), runs["val"].parent / "ex-val")
