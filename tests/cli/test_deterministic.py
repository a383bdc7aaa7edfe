"""--deterministic: cuDNN's deterministic algorithms for a whole command, and runs that repeat on a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from dpd_cli.artifacts.experts import ExpertSet
from dpd_cli.recipes.runtime import prepare_runtime
from tests.cli.conftest import TINY


@pytest.fixture
def cudnn_flags():
    """Leave torch.backends.cudnn as the test found it."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("flag", [True, False])
def test_prepare_runtime_sets_cudnn_for_the_command(cudnn_flags, flag):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = not flag, True
    assert prepare_runtime(None, "cpu", deterministic=flag).type == "cpu"
    assert torch.backends.cudnn.deterministic is flag
    assert torch.backends.cudnn.benchmark is (not flag)  # autotuning off with it, left alone without


def test_every_command_takes_it_and_records_it(dpd, cudnn_flags, tmp_path):
    ex, run = tmp_path / "ex", tmp_path / "run"
    torch.backends.cudnn.deterministic = False
    r = dpd("experts", "--num", "1", "--epochs", "3", "--out", ex, *TINY, "--deterministic")
    assert r.exit_code == 0, r.output
    assert torch.backends.cudnn.deterministic is True
    assert json.loads((ex / "experts.json").read_text())["settings"]["deterministic"] is True
    distill = [
        "distill",
        "--experts",
        ex,
        "--out",
        run,
        "--ipc",
        "1",
        "--syn-steps",
        "2",
        "--max-start-epoch",
        "1",
        "--expert-epochs",
        "1",
        "--checkpoint-every",
        "1",
        "--lr-img",
        "10",
        "--lr-lr",
        "1e-8",
        *TINY,
    ]
    assert dpd(*distill, "--iterations", "1").exit_code == 0
    assert torch.backends.cudnn.deterministic is False  # each command sets it from its own settings
    r = dpd(*distill, "--iterations", "2", "--resume", "--deterministic")  # may change on resume
    assert r.exit_code == 0, r.output
    assert torch.backends.cudnn.deterministic is True
    torch.backends.cudnn.deterministic = False
    r = dpd("evaluate", run, "--epochs", "2", "--runs", "1", "--threads", "1", "--deterministic", "--json")
    assert r.exit_code == 0, r.output
    assert torch.backends.cudnn.deterministic is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deterministic_expert_training_repeats_bit_for_bit_on_cuda(dpd, cudnn_flags, tmp_path):
    for name in ("a", "b"):
        r = dpd(
            "experts",
            "--num",
            "1",
            "--epochs",
            "3",
            "--out",
            tmp_path / name,
            "--width",
            "32",
            "--depth",
            "3",
            "--train-per-class",
            "64",
            "--device",
            "cuda",
            "--deterministic",
        )
        assert r.exit_code == 0, r.output
    a, b = ExpertSet(tmp_path / "a"), ExpertSet(tmp_path / "b")
    start_a, end_a = a.pair(0, 0, 3)
    start_b, end_b = b.pair(0, 0, 3)
    assert torch.equal(start_a, start_b) and torch.equal(end_a, end_b)
    assert not torch.equal(start_a, end_a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("memory", ["full", "low"])
def test_deterministic_distillation_without_dsa_repeats_bit_for_bit_on_cuda(cudnn_flags, memory):
    from dpd_cli.core.matching import StepPlan, meta_gradient
    from dpd_cli.models import FlatModel, build_model
    from tests.helpers import tiny_spec

    prepare_runtime(None, "cuda", deterministic=True)
    torch.manual_seed(0)
    fm = FlatModel(build_model(tiny_spec(3, 16, 10, 32, 3)).cuda())
    images = torch.randn(50, 3, 16, 16, device="cuda")
    labels = torch.arange(50, device="cuda") % 10
    start = fm.flatten()
    target = start + 0.01 * torch.randn_like(start)
    plan = StepPlan([torch.randperm(50, device="cuda")[:20] for _ in range(5)], [None] * 5)
    runs = [
        meta_gradient(fm, images, labels, torch.tensor(0.01, device="cuda"), start, target, plan, memory)
        for _ in range(2)
    ]
    assert torch.equal(runs[0].grad_images, runs[1].grad_images) and torch.equal(runs[0].grad_lr, runs[1].grad_lr)
