"""Correctness on a GPU: the meta-gradient on CUDA against the CPU (float64), a captured CUDA graph against
the eager computation, and no host synchronisation inside a distillation iteration.

The checks that mean something on the CPU too (low memory against full memory with DSA, the reference MTT
loop against dpd) run there unmarked; the CUDA ones are marked ``gpu`` (``pytest -m gpu``).
"""

from __future__ import annotations

import collections
import importlib.util
import random
import traceback
import warnings
from pathlib import Path

import pytest
import torch

from dpd_cli.config.settings import resolve
from dpd_cli.core import graphs, matching
from dpd_cli.core.pruning import PruneConfig, Pruner
from dpd_cli.models import FlatModel, ModelSpec, build_model
from dpd_cli.recipes import experts
from dpd_cli.recipes.distill import DistillRecipe

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec("convnet", 3, (16, 16), 4, width=8, depth=2)
N_IMAGES, N_STEPS = 8, 4
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
PRUNES = {
    "rho0": PruneConfig(0.0),
    "rho0.1-global": PruneConfig(0.1, "global"),
    "rho0.1-layer": PruneConfig(0.1, "layer"),
}


def iteration(
    device: str,
    memory: str,
    prune: PruneConfig,
    dsa: bool,
    batch: int | None,
    keep_graphs: int = 0,
    dtype=torch.float64,
) -> matching.MetaResult:
    """One tiny meta-gradient; the problem (network, parameters, images, batches, seeds) is drawn on the CPU."""
    torch.manual_seed(0)
    fm = FlatModel(build_model(SPEC).to(dtype))
    start = fm.flatten()
    target = start + 0.05 * torch.randn_like(start)
    images = torch.randn(N_IMAGES, 3, 16, 16, dtype=dtype)
    labels = torch.arange(SPEC.n_classes).repeat_interleave(N_IMAGES // SPEC.n_classes)
    g, rng, dev = torch.Generator().manual_seed(2), random.Random(1), torch.device(device)
    plan = matching.StepPlan(
        [None if batch is None else torch.randperm(N_IMAGES, generator=g)[:batch].to(dev) for _ in range(N_STEPS)],
        [rng.getrandbits(63) if dsa else None for _ in range(N_STEPS)],
    )
    fm.module.to(dev)
    pruner = Pruner(prune, [layer.numel for layer in fm.layers])
    res = matching.meta_gradient(
        fm,
        images.to(dev),
        labels.to(dev),
        torch.tensor(0.02, dtype=dtype, device=dev),
        start.to(dev),
        target.to(dev),
        plan,
        memory,
        loss_mask=pruner.loss_mask(prune.ratio),
        keep_graphs=keep_graphs,
    )
    return matching.MetaResult(
        *(None if t is None else t.cpu() for t in (res.loss, res.grad_images, res.grad_lr, res.keep))
    )


def assert_same(a: matching.MetaResult, b: matching.MetaResult, rtol: float = 1e-8) -> None:
    """Every output within ``rtol`` (largest absolute difference over the largest value) and the same loss mask."""
    for name, x, y in (
        ("loss", a.loss, b.loss),
        ("dL/dX", a.grad_images, b.grad_images),
        ("dL/dalpha", a.grad_lr, b.grad_lr),
    ):
        rel = float((x - y).abs().max() / y.abs().max().clamp_min(1e-300))
        assert rel <= rtol, f"{name} differs by {rel:.1e} relative"
    assert (a.keep is None) == (b.keep is None) and (a.keep is None or torch.equal(a.keep, b.keep)), (
        "the loss masks differ"
    )


@pytest.mark.parametrize("batch", [None, 4])
@pytest.mark.parametrize("prune", list(PRUNES))
@pytest.mark.parametrize("memory", ["full", "low"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_meta_gradient_on_cuda_equals_the_cpus_in_float64(memory, prune, batch):
    """DSA off: the two devices draw different random numbers, so augmented runs cannot be compared across them."""
    assert_same(
        iteration("cuda", memory, PRUNES[prune], False, batch), iteration("cpu", memory, PRUNES[prune], False, batch)
    )


@pytest.mark.parametrize("prune", ["rho0", "rho0.1-global"])
@pytest.mark.parametrize("device", DEVICES)
def test_low_memory_replays_full_memorys_augmentation(device, prune):
    """Low memory redraws each step's DSA from its seed in the backward sweep; keeping half the graphs changes nothing."""
    full = iteration(device, "full", PRUNES[prune], True, None)
    assert_same(iteration(device, "low", PRUNES[prune], True, None), full)
    assert_same(
        iteration(device, "low", PRUNES[prune], True, 4, keep_graphs=N_STEPS // 2),
        iteration(device, "full", PRUNES[prune], True, 4),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_the_reference_mtt_loop_gives_dpds_meta_gradient(device):
    spec = importlib.util.spec_from_file_location("mtt_reference", ROOT / "benchmarks" / "mtt_reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    result = ref.check_against_dpd(device)
    assert result["ok"], result


def _copy(res: matching.MetaResult) -> matching.MetaResult:
    return matching.MetaResult(
        *(None if t is None else t.clone() for t in (res.loss, res.grad_images, res.grad_lr, res.keep))
    )


@pytest.mark.parametrize("memory, dsa, ratio", [("full", False, 0.0), ("low", False, 0.01), ("full", True, 0.0)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_graph_replays_the_eager_iteration_under_deterministic_cudnn(memory, dsa, ratio):
    """With cuDNN's deterministic algorithms eager repeats itself (up to grid_sample's atomics with DSA), and so does
    the replay: equal to eager within the engine's check, and to the next replay bit for bit."""
    dev = torch.device("cuda")
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        torch.manual_seed(0)
        fm = FlatModel(build_model(ModelSpec("convnet", 3, (32, 32), 10, 32, 3)).to(dev))
        images, labels = torch.randn(20, 3, 32, 32, device=dev), torch.arange(20, device=dev) // 2
        start = fm.flatten()
        target, lr = start + 0.01 * torch.randn_like(start), torch.tensor(0.01, device=dev)
        rng = random.Random(1)
        plan = matching.StepPlan([None] * 6, [rng.getrandbits(63) if dsa else None for _ in range(6)])
        inputs = graphs.StaticInputs(fm.n_params, 6, None, tuple(images.shape), dsa, dev, images.dtype)
        inputs.load(start, target, plan)
        mask = Pruner(PruneConfig(ratio), [layer.numel for layer in fm.layers]).loss_mask(ratio)

        def fn():
            return matching.meta_gradient(
                fm, images, labels, lr, inputs.start, inputs.target, inputs.plan, memory, loss_mask=mask
            )

        cap = graphs.CudaCapture(dev)
        eager1, eager2 = cap.warm_up(fn), cap.warm_up(fn)
        graph, out = cap.capture(fn, None)
        graph.replay()
        replay1 = _copy(out)
        graph.replay()
        spread = graphs.differences(eager2, eager1)
        assert graphs.close_enough(replay1, eager1, spread=spread) is None
        if not dsa:
            assert max(spread.values()) == 0, spread
            assert graphs.close_enough(replay1, eager1) is None
        assert max(graphs.differences(out, replay1).values()) <= (0 if not dsa else 1e-6)
    finally:
        torch.backends.cudnn.deterministic = saved


def _count_syncs(fn) -> collections.Counter:
    """Host synchronisations during ``fn()`` (``set_sync_debug_mode("warn")``), by the innermost dpd line that made them."""
    where = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing" in str(message):  # not the debug mode's own "prototype feature" notice
            ours = [f for f in traceback.extract_stack()[:-1] if "dpd_cli" in f.filename]
            where[
                f"{Path(ours[-1].filename).name}:{ours[-1].lineno} ({ours[-1].line})"
                if ours
                else f"{filename}:{lineno}"
            ] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return where


@pytest.fixture(scope="module")
def cuda_experts(tmp_path_factory):
    out = tmp_path_factory.mktemp("experts") / "ex"
    return experts.run(
        resolve(
            "experts",
            {
                "dataset": "fashion-mnist-mini",
                "num": 1,
                "epochs": 2,
                "width": 8,
                "train_per_class": 20,
                "device": "cuda",
                "out": str(out),
            },
        )
    )


@pytest.mark.parametrize("cuda_graphs", [True, False])
@pytest.mark.parametrize("memory", ["full", "low"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_distillation_iteration_makes_no_host_sync_and_says_where_if_it_does(
    cuda_experts, tmp_path, memory, cuda_graphs
):
    """The loop ``dpd distill`` runs, 3 iterations between two metrics flushes (the flush may sync, by design)."""
    s = resolve(
        "distill",
        {
            "experts": str(cuda_experts),
            "ipc": 2,
            "syn_steps": 4,
            "memory": memory,
            "cuda_graphs": cuda_graphs,
            "prune_ratio": 0.01,
            "device": "cuda",
            "iterations": 6,
            "max_start_epoch": 1,
            "expert_epochs": 1,
            "lr_img": 1.0,
            "lr_lr": 0.0,
            "log_every": 6,
            "checkpoint_every": 1000,
            "out": str(tmp_path / "run"),
            "force": True,
        },
    )
    with DistillRecipe(s) as recipe:
        recipe.step()  # warm-up: first-touch allocations, library handles, the graph's capture
        recipe.flush()
        torch.cuda.synchronize()
        where = _count_syncs(lambda: [recipe.step() for _ in range(3)])
        recipe.flush()
    assert not where, dict(where)
