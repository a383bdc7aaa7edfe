"""``dpd evaluate``'s engine: the test transform, the random baseline, divergence, eval.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dpd_cli.artifacts.synthetic import load as load_synthetic
from dpd_cli.config.settings import resolve
from dpd_cli.data import Preprocess, load_dataset
from dpd_cli.recipes import evaluate as E
from dpd_cli.recipes.runtime import derive_seed
from tests.helpers import tiny_spec

_TINY = {"width": 4, "depth": 2, "train_per_class": 20, "threads": 1}


@pytest.fixture(scope="module")
def zca_run(tmp_path_factory) -> Path:
    """A finished 2-iteration run distilled with ZCA whitening from two tiny ZCA experts."""
    from dpd_cli.recipes import distill, experts

    tmp = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (
            ("DPD_EXPERTS_ROOT", "experts-root"),
            ("DPD_DATA_ROOT", "data-root"),
            ("DPD_CACHE_ROOT", "cache-root"),
        ):
            mp.setenv(var, str(tmp / sub))
        experts.run(resolve("experts", {**_TINY, "num": 2, "epochs": 2, "zca": True, "dsa": False, "out": tmp / "ex"}))
        distill.run(
            resolve(
                "distill",
                {
                    **_TINY,
                    "zca": True,
                    "ipc": 2,
                    "iterations": 2,
                    "syn_steps": 2,
                    "max_start_epoch": 1,
                    "expert_epochs": 1,
                    "lr_img": 10,
                    "lr_lr": 1e-8,
                    "experts": tmp / "ex",
                    "out": tmp / "run",
                },
            )
        )
    return tmp / "run"


@pytest.fixture
def run_copy(zca_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(zca_run, run, ignore=shutil.ignore_patterns(".*lock*"))
    return run


def _settings(**flags):
    return resolve("evaluate", {"epochs": 1, "runs": 2, "threads": 1, **flags})


def _record_trainings(monkeypatch) -> list[dict]:
    """Replace the training with a recorder (accuracy 0.5): what each training would have been given."""
    calls: list[dict] = []

    def fake(spec, xs, ys, x_test, y_test, epochs, lrs, s, seeds, device, on_epoch, x_val=None, y_val=None):
        for x, y, lr, seed in zip(xs, ys, lrs, seeds):
            calls.append(
                {
                    "x": x.clone(),
                    "y": y.clone(),
                    "x_test": x_test.clone(),
                    "y_test": y_test.clone(),
                    "lr": lr,
                    "seed": seed,
                    "x_val": x_val,
                    "y_val": y_val,
                }
            )
        return [E.TrainResult(0.5, None, None if x_val is None else 0.5)] * len(xs)

    monkeypatch.setattr(E, "_train_and_test", fake)
    return calls


def test_zca_run_applies_its_transform_to_test_and_baseline_images(run_copy, monkeypatch):
    calls = _record_trainings(monkeypatch)
    E.run(_settings(baseline=["random"]), run_copy)
    tensors, _ = load_synthetic(run_copy / "synthetic.safetensors")
    pre = Preprocess.from_tensors(tensors)
    assert pre.has_zca
    ds = load_dataset("fashion-mnist-mini")
    expected_test = pre.apply(ds.test_images)
    assert not torch.allclose(expected_test, pre.normalize(ds.test_images), atol=1e-2)  # ZCA changes the images
    distilled, random_ = calls[:2], calls[2:]
    for c in calls:
        assert torch.equal(c["x_test"], expected_test)
        assert torch.equal(c["y_test"], ds.test_labels)
    for c in distilled:
        assert torch.equal(c["x"], tensors["images"])
    for r, c in enumerate(random_):
        idx = E.random_subset(ds.train_labels, ds.n_classes, 2, derive_seed(0, "random-subset", r))
        assert torch.equal(c["x"], pre.apply(ds.train_images[idx]))  # baseline images whitened as well


def test_random_baseline_is_class_balanced_and_seeded(run_copy, monkeypatch):
    calls = _record_trainings(monkeypatch)
    E.run(_settings(baseline=["random"], distilled=False, runs=2), run_copy)
    E.run(_settings(baseline=["random"], distilled=False, runs=2), run_copy)
    E.run(_settings(baseline=["random"], distilled=False, runs=2, seed=1), run_copy)
    first, again, other = calls[0:2], calls[2:4], calls[4:6]
    for c in calls:
        assert torch.bincount(c["y"], minlength=10).tolist() == [2] * 10  # IPC 2 of every class
    for a, b in zip(first, again):
        assert torch.equal(a["x"], b["x"]) and a["seed"] == b["seed"]  # same seed: same subsets, same nets
    assert not torch.equal(first[0]["x"], first[1]["x"])  # each run draws its own subset
    assert not torch.equal(first[0]["x"], other[0]["x"])  # another --seed draws others


def test_random_subset_indices():
    labels = torch.arange(5).repeat_interleave(7)  # 5 classes x 7
    idx = E.random_subset(labels, 5, 3, seed=11)
    assert torch.bincount(labels[idx], minlength=5).tolist() == [3] * 5
    assert len(set(idx.tolist())) == 15
    assert torch.equal(idx, E.random_subset(labels, 5, 3, seed=11))
    assert not torch.equal(idx, E.random_subset(labels, 5, 3, seed=12))


def _blobs(n: int = 12, side: int = 8, n_classes: int = 3):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n_classes).repeat(n // n_classes)
    x = torch.randn(n, 1, side, side, generator=g) + y.view(-1, 1, 1, 1).float()
    return x, y


def test_the_first_non_finite_epoch_is_the_one_reported(monkeypatch):
    losses = iter([1.0, 2.0, float("nan"), 3.0, float("inf")])  # epoch 3 goes bad first; 5 epochs for E = 4
    monkeypatch.setattr(E, "train_epoch", lambda *a, **k: (torch.tensor(next(losses)), None))
    x, y = _blobs()
    s = _settings(dsa=False, batch=4)
    _, diverged = E._train(tiny_spec(), [x], [y], 4, [0.01], s, [0], torch.device("cpu"), lambda epoch, loss: None)
    assert diverged == [3]


@pytest.mark.parametrize("lr, diverges", [(0.01, False), (1e9, True)])
def test_train_and_test_reports_divergence(lr, diverges):
    x, y = _blobs()
    s = _settings(dsa=False, batch=4)
    epochs_seen = []
    ((acc, diverged, _),) = E._train_and_test(
        tiny_spec(),
        [x],
        [y],
        x,
        y,
        4,
        [lr],
        s,
        [0],
        torch.device("cpu"),
        lambda epoch, loss: epochs_seen.append((epoch, float(loss))),
    )
    assert 0.0 <= acc <= 1.0 and len(epochs_seen) == 5  # --epochs E runs E + 1
    if diverges:
        first_bad = next(epoch for epoch, loss in epochs_seen if not torch.isfinite(torch.tensor(loss)))
        assert diverged == first_bad
    else:
        assert diverged is None and all(torch.isfinite(torch.tensor(loss)) for _, loss in epochs_seen)


def test_diverged_runs_are_recorded_and_still_counted(run_copy):
    result = E.run(_settings(lr=1e9, runs=2, epochs=6, batch=4), run_copy)
    entry = result["results"][0]
    assert entry["diverged_runs"] == [0, 1]
    assert entry["mean"] == sum(entry["accuracies"]) / 2  # no run is dropped from the mean
    stored = json.loads((run_copy / "eval.json").read_text())["results"][-1]
    assert stored["diverged_runs"] == [0, 1]
    sane = E.run(_settings(runs=1), run_copy)["results"][0]
    assert sane["diverged_runs"] == []


def test_verdict():
    results = [
        {"source": "distilled", "model": "convnet", "mean": 0.605},
        {"source": "distilled", "model": "vgg11", "mean": 0.595},
        {"source": "random", "model": "convnet", "mean": 0.10},  # baselines are not gated
    ]
    assert E.verdict(results, None) == {"fail_under": None, "passed": True, "below": [], "no_gain": []}
    assert E.verdict(results, 59.5) == {"fail_under": 59.5, "passed": True, "below": [], "no_gain": []}  # equal passes
    below = [{"model": "vgg11", "mean": 0.595}]
    assert E.verdict(results, 60) == {"fail_under": 60, "passed": False, "below": below, "no_gain": []}
    assert E.verdict(results, 61)["below"] == [{"model": "convnet", "mean": 0.605}, {"model": "vgg11", "mean": 0.595}]
    assert E.verdict([], 99)["passed"] is True
    # Distillation that did not help fails only with --fail-if-no-gain.
    results[1]["no_gain"] = {"reason": "selected_initial"}
    assert E.verdict(results, None) == {"fail_under": None, "passed": True, "below": [], "no_gain": ["vgg11"]}
    assert E.verdict(results, None, fail_if_no_gain=True)["passed"] is False


@pytest.mark.parametrize("soft", [False, True], ids=["classes", "soft-labels"])
def test_train_epoch_sums_the_loss_and_counts_the_right_answers_of_every_batch(soft):
    # Against the same epoch written out, batch by batch: 12 images in batches of 5, 5 and 2.
    import random

    import torch.nn.functional as F

    from dpd_cli.core.train import train_epoch
    from dpd_cli.models import build_model

    x, y = _blobs(12)
    if soft:
        y = F.softmax(torch.randn(12, 3, generator=torch.Generator().manual_seed(1)), dim=1)

    def fresh():
        torch.manual_seed(0)
        net = build_model(tiny_spec())
        return net, torch.optim.SGD(net.parameters(), lr=0.1), torch.Generator().manual_seed(2), random.Random(3)

    net, opt, gen, rng = fresh()
    loss_sum, correct = train_epoch(net, opt, x, y, 5, gen, rng, augment=False)
    net, opt, gen, _ = fresh()
    net.train()
    order, want_loss, want_right = torch.randperm(12, generator=gen), 0.0, 0
    for i in (0, 5, 10):
        idx = order[i : i + 5]
        out = net(x[idx])
        loss = F.cross_entropy(out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        want_loss += float(loss.detach()) * len(idx)
        want_right += int((out.argmax(1) == (y[idx].argmax(1) if soft else y[idx])).sum())
    assert float(loss_sum) == pytest.approx(want_loss, rel=1e-6) and int(correct) == want_right
    assert train_epoch(net, opt, x, y, 5, gen, rng, augment=False, count_correct=False)[1] is None
    empty = train_epoch(net, opt, x[:0], y[:0], 5, gen, rng, augment=False)
    assert float(empty[0]) == 0.0 and int(empty[1]) == 0


def test_trainings_in_groups_score_as_they_do_one_at_a_time(run_copy):
    alone = E.run(_settings(concurrent=1, baseline=["random"]), run_copy)["results"]
    together = E.run(_settings(concurrent=4, baseline=["random"]), run_copy)["results"]  # one group of 4
    for a, b in zip(alone, together, strict=True):
        assert (a["source"], a["seeds"]) == (b["source"], b["seeds"])
        assert a["accuracies"] == pytest.approx(b["accuracies"], abs=2e-3)
