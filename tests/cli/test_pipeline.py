"""End to end: dpd experts -> dpd distill -> dpd evaluate on the embedded dataset, through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpd_cli.artifacts.experts import ExpertSet
from dpd_cli.core.pruning import prune_count
from tests.cli.conftest import DISTILL_TINY, TINY

DISTILL = [*DISTILL_TINY, *TINY]


def test_experts_writes_trajectories(dpd, experts):
    files = sorted(experts.glob("expert_*.safetensors"))
    assert [f.name for f in files] == ["expert_00000.safetensors", "expert_00001.safetensors"]
    es = ExpertSet(experts)
    assert es.epochs == 3 and len(es) == 2
    assert len(es.meta["test_accuracy"]) == 4  # init + 3 epochs
    assert [name for name, _ in es.layout][0] == "conv1.weight"
    # Every stored epoch is a distinct copy (the reference code aliases them on CPU).
    rows = es.files[0].rows("trajectory", [0, 1, 2, 3])
    for a, b in zip(rows[:-1], rows[1:]):
        assert not torch.equal(a, b)
    start, target = es.pair(1, 1, 2)
    assert torch.equal(start, es.files[1].get("trajectory")[1])
    assert torch.equal(target, es.files[1].get("trajectory")[3])
    # Two experts differ (different seeds).
    assert not torch.equal(es.files[0].rows("trajectory", [0]), es.files[1].rows("trajectory", [0]))


def test_experts_rerun_skips_finished(dpd, experts):
    before = {f: f.stat().st_mtime_ns for f in experts.glob("expert_*.safetensors")}
    r = dpd("experts", "--num", "3", "--epochs", "3", "--out", experts, *TINY)
    assert r.exit_code == 0, r.output
    assert "expert 0: already finished, skipped" in r.output
    assert (experts / "expert_00002.safetensors").exists()
    assert {f: f.stat().st_mtime_ns for f in before} == before


def test_experts_refuses_mismatched_folder(dpd, experts):
    r = dpd("experts", "--num", "2", "--epochs", "3", "--lr", "0.05", "--out", experts, *TINY)
    assert r.exit_code == 2
    assert "other settings" in r.output and "lr: folder has 0.01, settings say 0.05" in r.output
    assert "Traceback" not in r.output


def test_experts_json(dpd, experts):
    r = dpd("experts", "--num", "2", "--epochs", "3", "--out", experts, "--json", *TINY)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert len(data["experts"]) == 2
    assert all(0 <= e["final_test_accuracy"] <= 1 for e in data["experts"])


def test_distill_writes_complete_run(dpd, experts, tmp_path):
    run = tmp_path / "run"
    r = dpd("distill", "--experts", experts, "--out", run, "--prune-ratio", "0.1", *DISTILL)
    assert r.exit_code == 0, r.output
    for name in ("settings.json", "synthetic.safetensors", "metrics.jsonl", "prune_frequency.safetensors", "grid.png"):
        assert (run / name).is_file(), name
    # Checkpoint 0 (the initial images) and the newest two.
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.safetensors")) == [
        "ckpt-000000.safetensors",
        "ckpt-000002.safetensors",
        "ckpt-000004.safetensors",
    ]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 3, 4]
    n_params = ExpertSet(experts).files[0].shape("trajectory")[1]
    for x in lines:
        assert math.isfinite(x["loss"]) and x["lr"] > 0
        # Global scope: the per-layer pruned counts add up to ceil(rho * P).
        assert sum(x["pruned"].values()) == prune_count(0.1, n_params)
        assert x["pruned_fraction"] == pytest.approx(0.1, abs=1 / n_params + 1e-9)
    settings = json.loads((run / "settings.json").read_text())
    assert settings["settings"]["prune_ratio"] == 0.1 and settings["versions"]["dpd"]


def test_distill_refuses_existing_run_then_resumes(dpd, experts, tmp_path):
    run = tmp_path / "run"
    args = ["distill", "--experts", experts, "--out", run, *DISTILL]
    assert dpd(*args).exit_code == 0
    r = dpd(*args)
    assert r.exit_code == 2 and "--resume" in r.output and "--force" in r.output
    r = dpd(*args[: -len(DISTILL)], *[a if a != "4" else "6" for a in DISTILL], "--resume")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert dpd(*args, "--force").exit_code == 0


def test_resume_equals_uninterrupted(dpd, experts, tmp_path):
    from dpd_cli.artifacts.synthetic import load as load_synthetic

    base = ["distill", "--experts", experts, *DISTILL[2:]]  # drop "--ipc 1": use 2 to exercise batches
    common = [*base, "--ipc", "2", "--batch-syn", "7"]
    full = tmp_path / "full"
    assert dpd(*common, "--iterations", "5", "--out", full).exit_code == 0
    part = tmp_path / "part"
    assert dpd(*common, "--iterations", "3", "--out", part).exit_code == 0
    assert dpd(*common, "--iterations", "5", "--out", part, "--resume").exit_code == 0
    a, _ = load_synthetic(full / "synthetic.safetensors")
    b, _ = load_synthetic(part / "synthetic.safetensors")
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["lr"], b["lr"])
    pa = (full / "metrics.jsonl").read_text().splitlines()
    pb = (part / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]  # noqa: E731
    assert strip(pa) == strip(pb)


def test_distill_refuses_mismatched_experts(dpd, experts, tmp_path):
    r = dpd(
        "distill",
        "--experts",
        experts,
        "--out",
        tmp_path / "run",
        *DISTILL[:-8],
        "--width",
        "16",
        "--depth",
        "2",
        "--train-per-class",
        "20",
    )
    assert r.exit_code == 2
    assert "width: experts have 8, settings give 16" in r.output


def test_distill_without_experts_says_how(dpd, tmp_path):
    r = dpd("distill", *DISTILL)
    assert r.exit_code == 2
    assert "No experts found" in r.output and "dpd experts" in r.output


def test_evaluate_reports_and_gates(dpd, experts, tmp_path):
    run = tmp_path / "run"
    assert dpd("distill", "--experts", experts, "--out", run, *DISTILL).exit_code == 0
    r = dpd("evaluate", run, "--epochs", "3", "--runs", "2", "--baseline", "random", "--json", "--threads", "1")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    by_source = {e["source"]: e for e in data["results"]}
    assert set(by_source) == {"distilled", "random"}
    for e in by_source.values():
        assert e["runs"] == 2 and all(0 <= a <= 1 for a in e["accuracies"]) and math.isfinite(e["mean"])
    stored = json.loads((run / "eval.json").read_text())
    assert stored["format"] == "dpd.eval" and len(stored["results"]) == 2
    assert (data["fail_under"], data["passed"], data["below"]) == (None, True, [])
    r = dpd("evaluate", run, "--epochs", "1", "--runs", "1", "--fail-under", "99.9", "--quiet", "--threads", "1")
    assert r.exit_code == 3
    assert "below threshold" in r.output
    # The verdict is part of the engine's result, so --json carries it.
    r = dpd("evaluate", run, "--epochs", "1", "--runs", "1", "--fail-under", "99.9", "--json", "--threads", "1")
    assert r.exit_code == 3
    data = json.loads(r.stdout)
    assert (data["fail_under"], data["passed"]) == (99.9, False)
    assert data["below"] == [{"model": "convnet", "mean": data["results"][0]["mean"]}]


def test_evaluate_says_when_a_training_diverges(dpd, experts, tmp_path):
    run = tmp_path / "run"
    assert dpd("distill", "--experts", experts, "--out", run, *DISTILL).exit_code == 0
    r = dpd("evaluate", run, "--epochs", "6", "--runs", "2", "--batch", "4", "--lr", "1e9", "--threads", "1")
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())  # undo Rich's wrapping
    assert "diverged: training loss NaN/Inf from epoch" in out
    assert "2 of 2 trainings diverged" in out and "rerun with a lower --lr" in out
    r = dpd("inspect", run)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "(2)*" in out and "2 of 2 trainings diverged" in out and "distilled / convnet runs 0, 1" in out
