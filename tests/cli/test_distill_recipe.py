"""dpd distill as a recipe: kept checkpoints, prune masks that carry state, resume limits, experts chosen for the user."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dpd_cli.artifacts import layout
from dpd_cli.artifacts.synthetic import load as load_synthetic
from dpd_cli.io import storage
from tests.cli.conftest import TINY

PLAIN = [
    "--ipc",
    "1",
    "--syn-steps",
    "3",
    "--max-start-epoch",
    "2",
    "--expert-epochs",
    "1",
    "--lr-img",
    "10",
    "--lr-lr",
    "1e-8",
    "--checkpoint-every",
    "2",
    "--threads",
    "1",
]
DISTILL = [*PLAIN, *TINY]


def ckpts(run: Path) -> list[int]:
    return sorted(layout.checkpoint_iteration(p) for p in layout.checkpoints(run))


@pytest.mark.parametrize(
    ("keep", "expected"), [("latest", [0, 8, 10]), ("all", [0, 2, 4, 6, 8, 10]), ("2", [0, 4, 8, 10])]
)
def test_keep_checkpoints(dpd, experts, tmp_path, keep, expected):
    run = tmp_path / "run"
    r = dpd("distill", "--experts", experts, "--out", run, *DISTILL, "--iterations", "10", "--keep-checkpoints", keep)
    assert r.exit_code == 0, r.output
    assert ckpts(run) == expected
    # Checkpoint 0 holds the real images the run started from; the last one the final set.
    first, _ = load_synthetic(layout.checkpoint_path(run, 0))
    last, meta = load_synthetic(layout.checkpoint_path(run, 10))
    final, _ = load_synthetic(run / "synthetic.safetensors")
    assert torch.equal(last["images"], final["images"]) and meta["iteration"] == 10
    assert not torch.equal(first["images"], final["images"])


def test_resume_below_the_checkpoint_is_refused(dpd, experts, tmp_path):
    run = tmp_path / "run"
    args = ["distill", "--experts", experts, "--out", run, *DISTILL]
    assert dpd(*args, "--iterations", "6").exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    r = dpd(*args, "--iterations", "4", "--resume")
    assert r.exit_code == 2
    assert "has a checkpoint at iteration 6, past --iterations 4" in r.output and "--iterations 6 or more" in r.output
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    r = dpd(*args, "--iterations", "6", "--resume")  # at the checkpoint already: nothing to do, labels stay right
    assert r.exit_code == 0, r.output
    assert load_synthetic(run / "synthetic.safetensors")[1]["iteration"] == 6


def test_print_config_shows_the_settings_the_experts_decide_and_runs_as_printed(dpd, tmp_path):
    root = tmp_path / "experts-root"  # DPD_EXPERTS_ROOT (conftest)
    folder = root / "w16"
    tiny = ["--width", "16", "--depth", "2", "--train-per-class", "20", "--num", "1", "--epochs", "2"]
    assert dpd("experts", *tiny, "--threads", "1", "--out", folder).exit_code == 0
    r = dpd("distill", "--experts", folder, "--print-config")
    assert r.exit_code == 0, r.output
    lines = {" ".join(line.split()) for line in r.stdout.splitlines()}
    for line in ("width = 16 # experts", "depth = 2 # experts", "train_per_class = 20 # experts", "ipc = 10 # default"):
        assert line in lines, r.stdout
    assert f'experts = "{folder}" # flag --experts' in lines
    (tmp_path / "run.toml").write_text(r.stdout)
    run = tmp_path / "run"
    r = dpd("distill", "--config", tmp_path / "run.toml", "--out", run, *PLAIN, "--iterations", "2")
    assert r.exit_code == 0, r.output
    recorded = json.loads((run / "settings.json").read_text())["settings"]
    assert (recorded["width"], recorded["depth"], recorded["train_per_class"]) == (16, 2, 20)
    # Without --experts: the folder the run would choose, named so that the printed settings choose it again.
    r = dpd("distill", "--print-config")
    assert r.exit_code == 0, r.output
    lines = {" ".join(line.split()) for line in r.stdout.splitlines()}
    assert f'experts = "{folder}" # the newest fitting folder under the experts root' in lines
    assert "width = 16 # experts" in lines


def test_resume_with_other_settings_names_each_one(dpd, experts, tmp_path):
    run = tmp_path / "run"
    args = ["distill", "--experts", experts, "--out", run, *DISTILL, "--iterations", "2"]
    assert dpd(*args).exit_code == 0
    r = dpd(*args, "--ipc", "2", "--seed", "5", "--iterations", "4", "--resume")  # --iterations may change
    assert r.exit_code == 2
    flags = "--iterations, --checkpoint-every, --keep-checkpoints, --log-every, --device, --threads, --out, "
    flags += "--experts, --data-dir, --dist-timeout, --host-memory, --cuda-graphs, --keep-graphs, --deterministic, --lr-img, --lr-lr"
    assert r.stderr.splitlines()[0] == (
        f"Error: {run} was started with other settings (--seed: the run has 0, settings give 5; --ipc: the run "
        f"has 1, settings give 2). Resume with the same settings (only {flags} may change), or use --force to "
        "start over."
    )


@pytest.mark.parametrize(
    "prune",
    [
        ["--prune-ratio", "0.1", "--prune-mask", "ema", "--prune-ema-beta", "0.7"],
        ["--prune-ratio", "0.1", "--prune-mode", "network", "--prune-criterion", "layer-z"],
        [
            "--prune-ratio",
            "0.25",
            "--prune-mode",
            "network",
            "--prune-mask",
            "ema",
            "--prune-direction",
            "smallest",
            "--prune-criterion",
            "layer-rank",
            "--prune-scope",
            "layer",
        ],
    ],
    ids=["ema", "network-step", "network-ema-smallest"],
)
def test_stateful_masks_resume_exactly(dpd, experts, tmp_path, prune):
    args = ["distill", "--experts", experts, *DISTILL, *prune]
    full, part = tmp_path / "full", tmp_path / "part"
    assert dpd(*args, "--iterations", "6", "--out", full).exit_code == 0
    assert dpd(*args, "--iterations", "3", "--out", part).exit_code == 0
    r = dpd(*args, "--iterations", "6", "--out", part, "--resume")
    assert r.exit_code == 0, r.output
    a, ma = load_synthetic(full / "synthetic.safetensors")
    b, _ = load_synthetic(part / "synthetic.safetensors")
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["lr"], b["lr"])
    ck, _ = load_synthetic(layout.checkpoint_path(full, 6))
    assert ck["prune_state"].shape == ck["prune_counts"].shape  # the state a resume needs is in the checkpoint
    strip = lambda run: [
        {k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
        for x in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert strip(full) == strip(part)
    records = strip(full)
    assert (
        records[0]["prune_rule"]
        == ma["settings"]["prune_scope"]
        + "/"
        + ma["settings"]["prune_criterion"]
        + "/"
        + ma["settings"]["prune_direction"]
        + "/"
        + ("ema0.7" if "0.7" in prune else "ema0.9" if "ema" in prune else "step")
        + "/"
        + ma["settings"]["prune_mode"]
    )
    if "network" in prune:  # the first iteration has no earlier scores: it prunes nothing
        assert sum(records[0]["pruned"].values()) == 0 and sum(records[1]["pruned"].values()) > 0


def test_keeping_graphs_in_low_memory_changes_no_result_and_may_change_on_resume(dpd, experts, tmp_path):
    """--keep-graphs moves work between the sweeps, not the numbers; a resume may choose another K."""
    args = ["distill", "--experts", experts, *DISTILL, "--memory", "low", "--prune-ratio", "0.1"]
    low, kept, mixed = tmp_path / "low", tmp_path / "kept", tmp_path / "mixed"
    assert dpd(*args, "--iterations", "4", "--out", low).exit_code == 0
    r = dpd(*args, "--iterations", "4", "--out", kept, "--keep-graphs", "2")
    assert r.exit_code == 0, r.output
    assert "memory low (2 graphs kept)" in r.output
    assert dpd(*args, "--iterations", "2", "--out", mixed, "--keep-graphs", "3").exit_code == 0
    r = dpd(*args, "--iterations", "4", "--out", mixed, "--resume")
    assert r.exit_code == 0, r.output
    a, _ = load_synthetic(low / "synthetic.safetensors")
    start, _ = load_synthetic(layout.checkpoint_path(low, 0))
    # The images really moved, by far more than the tolerance below: a wrong gradient would show.
    assert (a["images"] - start["images"]).abs().max() > 100 * 1e-5 and not torch.equal(a["lr"], start["lr"])
    for run in (kept, mixed):
        b, meta = load_synthetic(run / "synthetic.safetensors")
        assert torch.allclose(b["images"], a["images"], rtol=1e-4, atol=1e-5) and torch.allclose(
            b["lr"], a["lr"], rtol=1e-5
        )
        assert meta["settings"]["memory"] == "low"
    assert load_synthetic(kept / "synthetic.safetensors")[1]["settings"]["keep_graphs"] == 2
    assert (
        load_synthetic(mixed / "synthetic.safetensors")[1]["settings"]["keep_graphs"] == 0
    )  # what the resume ran with


def test_rho_zero_is_plain_mtt_with_no_prune_state(dpd, experts, tmp_path):
    run = tmp_path / "run"
    r = dpd("distill", "--experts", experts, "--out", run, *DISTILL, "--iterations", "2", "--prune-ratio", "0")
    assert r.exit_code == 0, r.output
    t, meta = load_synthetic(layout.checkpoint_path(run, 2))
    assert "prune_state" not in t and int(t["prune_counts"].sum()) == 0
    assert all("prune_rule" not in json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())


def test_zca_checkpoints_refer_to_the_run_preprocessing(dpd, tmp_path):
    ex, run = tmp_path / "ex", tmp_path / "run"
    assert dpd("experts", "--num", "1", "--epochs", "2", "--zca", "--out", ex, *TINY).exit_code == 0
    r = dpd("distill", "--experts", ex, "--out", run, *DISTILL, "--iterations", "2")
    assert r.exit_code == 0, r.output
    ckpt = layout.checkpoint_path(run, 2)
    header, raw = storage.read_header(ckpt)
    assert "zca_matrix" not in header and raw["format_version"] == "2"  # the matrices are not copied into checkpoints
    t, _ = load_synthetic(ckpt)
    s, _ = load_synthetic(run / "synthetic.safetensors")
    assert torch.equal(t["zca_matrix"], s["zca_matrix"]) and torch.equal(t["zca_mean"], s["zca_mean"])
    assert os.path.getsize(ckpt) < os.path.getsize(run / "synthetic.safetensors")
    alone = tmp_path / "alone.safetensors"
    shutil.copy(ckpt, alone)
    with pytest.raises(
        storage.StorageError, match="its ZCA matrices live in the run directory's preprocess.safetensors"
    ):
        load_synthetic(alone)


def test_distill_finds_the_experts_and_takes_their_network(dpd, tmp_path):
    """No --experts, no --dataset, no --width: the only experts folder under the root is used and announced."""
    r = dpd("experts", "--num", "1", "--epochs", "3", *TINY)  # the default folder under DPD_EXPERTS_ROOT
    assert r.exit_code == 0, r.output
    (folder,) = [p.parent for p in (tmp_path / "experts-root").rglob("experts.json")]
    plain = PLAIN  # no network or data settings
    r = dpd("distill", *plain, "--iterations", "2", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0].startswith(f"Using experts {folder} (pass --experts to choose another).")
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())["settings"]
    assert (settings["width"], settings["depth"], settings["train_per_class"]) == (8, 2, 20)  # from the folder
    # A given setting the folder does not fit is still an error, naming what was asked.
    r = dpd("distill", *plain, "--width", "16", "--iterations", "2", "--out", tmp_path / "run2")
    assert r.exit_code == 2 and "None of the experts folders under" in r.output and "width 16" in r.output


# ----------------------------------------------------------------------------------------------
# evaluate --select through the CLI, with real (tiny) trainings


@pytest.fixture
def val_run(dpd, tmp_path) -> Path:
    ex, run = tmp_path / "exv", tmp_path / "runv"
    assert dpd("experts", "--num", "1", "--epochs", "3", "--val-per-class", "5", "--out", ex, *TINY).exit_code == 0
    r = dpd("distill", "--experts", ex, "--out", run, *DISTILL, "--iterations", "4", "--keep-checkpoints", "all")
    assert r.exit_code == 0, r.output
    return run


@pytest.mark.parametrize("select", ["val", "final", "test-max"])
def test_evaluate_select_modes(dpd, val_run, select):
    r = dpd(
        "evaluate",
        val_run,
        "--select",
        select,
        "--epochs",
        "2",
        "--runs",
        "1",
        "--baseline",
        "init",
        "--json",
        "--threads",
        "1",
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    d = next(e for e in data["results"] if e["source"] == "distilled")
    init = next(e for e in data["results"] if e["source"] == "init")
    assert d["select"] == select and init["iteration"] == 0
    per = {c["iteration"]: c for c in d.get("checkpoints", [])}
    if select == "final":
        assert d["selected_iteration"] == 4 and not per
    else:
        assert sorted(per) == [0, 2, 4]
        key = "val_accuracy" if select == "val" else "mean"
        best = max(per, key=lambda it: (per[it][key], it))
        assert d["selected_iteration"] == best and d["mean"] == per[best]["mean"]
        assert d["optimistic"] == (select == "test-max")
    assert d["final_accuracy"] == (per[4]["mean"] if per else d["mean"])
    assert 0 <= d["val_accuracy"] <= 1
    r = dpd("inspect", val_run)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    if select == "test-max":
        assert "chosen by † the best TEST accuracy: optimistic" in out
    if select == "val":
        assert "chosen by the best validation accuracy" in out


def test_evaluate_select_val_without_a_split(dpd, experts, tmp_path):
    run = tmp_path / "run"
    assert dpd("distill", "--experts", experts, "--out", run, *DISTILL, "--iterations", "2").exit_code == 0
    r = dpd("evaluate", run, "--select", "val", "--epochs", "1", "--runs", "1", "--threads", "1")
    assert r.exit_code == 2 and "--select val needs a validation split" in r.output and "Traceback" not in r.output
    assert not (run / "eval.json").exists()


# ----------------------------------------------------------------------------------------------
# Soft labels (DATM)


def test_soft_labels_are_learned_stored_and_evaluated(dpd, experts, tmp_path, monkeypatch):
    from dpd_cli.artifacts.experts import ExpertSet
    from dpd_cli.recipes import evaluate as E

    run = tmp_path / "soft"
    args = ["distill", "--experts", experts, "--out", run, *DISTILL, "--soft-labels", "--lr-y", "5"]
    r = dpd(*args, "--iterations", "4")
    assert r.exit_code == 0, r.output
    t, meta = load_synthetic(run / "synthetic.safetensors")
    first, _ = load_synthetic(layout.checkpoint_path(run, 0))
    assert meta["soft_labels"]["expert"] == 0 and meta["soft_labels"]["epoch"] == 3  # expert 0's last epoch
    assert 0 <= meta["soft_labels"]["initial_accuracy"] <= 1
    assert t["label_logits"].shape == (10, 10) and not torch.equal(t["label_logits"], first["label_logits"])  # learned
    # Checkpoint 0's logits are expert 0's logits on the initial images (computed here without dpd's student code).
    from dpd_cli.models import FlatModel, build_model

    with ExpertSet(experts) as es:
        fm = FlatModel(build_model(es.spec))
        fm.load_(es.files[0].rows("trajectory", [3])[0])
        want = fm.module(first["images"])
    torch.testing.assert_close(first["label_logits"], want, rtol=1e-5, atol=1e-5)

    # inspect shows the labels as soft, with each class's own mass computed here from the logits.
    probs = torch.softmax(t["label_logits"].double(), dim=1)
    own = [float(probs[t["labels"] == c].mean(0)[c]) for c in range(10)]
    for target in (run, run / "synthetic.safetensors"):
        r = dpd("inspect", target)
        assert r.exit_code == 0, r.output
        text = " ".join(r.output.split())  # the facts wrap with the terminal
        assert "learned from expert 0's logits at epoch 3" in text and "Soft labels by class" in text
        assert f"on average {sum(own) / 10:.0%} of an image's label mass is on its own class" in text
    r = dpd("inspect", run / "synthetic.safetensors", "--json")
    mass = json.loads(r.output)["details"]["soft_labels"]
    assert [round(c["own"], 6) for c in mass] == [round(o, 6) for o in own]

    # evaluate trains on softmax(logits); the random baseline keeps hard labels.
    seen = []

    def fake(spec, xs, ys, x_test, y_test, epochs, lrs, s, seeds, device, on_epoch, x_val=None, y_val=None):
        seen.extend(y.clone() for y in ys)
        return [E.TrainResult(0.5, None, None)] * len(ys)

    monkeypatch.setattr(E, "_train_and_test", fake)
    r = dpd("evaluate", run, "--epochs", "1", "--runs", "1", "--baseline", "random", "--threads", "1", "--quiet")
    assert r.exit_code == 0, r.output
    assert torch.equal(seen[0], torch.softmax(t["label_logits"], dim=1)) and seen[1].dtype == torch.int64

    # An exact resume keeps the labels; switching soft labels on or off at --resume is refused.
    part = tmp_path / "part"
    assert dpd(*args[:4], part, *args[5:], "--iterations", "2").exit_code == 0
    assert dpd(*args[:4], part, *args[5:], "--iterations", "4", "--resume").exit_code == 0
    b, _ = load_synthetic(part / "synthetic.safetensors")
    assert torch.equal(t["label_logits"], b["label_logits"]) and torch.equal(t["images"], b["images"])
    hard = tmp_path / "hard"
    assert dpd("distill", "--experts", experts, "--out", hard, *DISTILL, "--iterations", "2").exit_code == 0
    r = dpd("inspect", hard)
    assert "hard (one class per image)" in r.output and "Soft labels" not in r.output
    r = dpd("distill", "--experts", experts, "--out", hard, *DISTILL, "--iterations", "4", "--soft-labels", "--resume")
    assert (
        r.exit_code == 2
        and "was distilled with hard labels; --soft-labels cannot be switched on on --resume" in r.output
    )


def test_soft_label_options_need_soft_labels(dpd, experts, tmp_path):
    r = dpd("distill", "--experts", experts, "--out", tmp_path / "r", *DISTILL, "--init", "real-correct")
    assert r.exit_code == 2 and "--init real-correct needs --soft-labels" in r.output


def test_a_refused_run_leaves_no_folder(dpd, experts, tmp_path, monkeypatch):
    out = tmp_path / "runs" / "deep" / "r"
    r = dpd("distill", "--experts", experts, "--out", out, *DISTILL, "--ipc", "21", "--iterations", "2")
    assert r.exit_code == 2 and "--ipc 21 is larger than class 'T-shirt/top'" in r.output
    r = dpd("distill", "--experts", experts, "--out", out, *DISTILL, "--iterations", "2", "--batch-syn", "11")
    assert r.exit_code == 2
    assert " ".join(r.output.split()) == (
        "Error: --batch-syn 11 is larger than the synthetic set, which has 10 images (--ipc 1 × 10 classes). Use "
        "--batch-syn 10 or less, or leave it out to use all images in every step."
    )
    from dpd_cli.errors import DataError

    def refuse(*args):
        raise DataError("no images")

    monkeypatch.setattr(
        "dpd_cli.recipes.distill_inputs.init_images", refuse
    )  # refused once the run directory is locked
    r = dpd("distill", "--experts", experts, "--out", out, *DISTILL, "--iterations", "2")
    assert r.exit_code == 2 and "no images" in r.output
    assert not (tmp_path / "runs").exists()  # nor the parents made for --out
    (tmp_path / "runs").mkdir()
    r = dpd("distill", "--experts", experts, "--out", out, *DISTILL, "--iterations", "2")
    assert r.exit_code == 2 and [p.name for p in tmp_path.joinpath("runs").iterdir()] == []


def test_init_real_correct_keeps_only_accepted_images():
    """--init real-correct walks each class's seeded permutation and keeps the first images the expert gets right."""
    from dpd_cli.config.settings import resolve
    from dpd_cli.data import Preprocess, load_dataset
    from dpd_cli.errors import DataError
    from dpd_cli.recipes.distill_inputs import init_images as _init_images

    ds = load_dataset("fashion-mnist-mini", train_per_class=30)
    pre = Preprocess(torch.tensor(ds.mean), torch.tensor(ds.std))
    s = resolve("distill", {"ipc": 3, "soft_labels": True, "init": "real-correct"})
    brighter = lambda x, c: x.mean(dim=(1, 2, 3)) > x.mean()  # noqa: E731  (a stand-in for "classified correctly")
    images, labels = _init_images(s, ds, pre, torch.device("cpu"), brighter)
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    for c in range(10):  # every kept image passed the test its class's candidates were put to
        cand = pre.apply(ds.train_images[ds.train_labels == c])
        threshold = cand.mean()  # the stand-in compares with the mean of the chunk it sees: all 30 at once here
        assert (images[3 * c : 3 * c + 3].mean(dim=(1, 2, 3)) > threshold).all()
    plain, _ = _init_images(resolve("distill", {"ipc": 3}), ds, pre, torch.device("cpu"))
    assert not torch.equal(images, plain)  # some random picks were refused
    with pytest.raises(DataError, match="expert 0 classifies only 0 training images of class 'T-shirt/top' correctly"):
        _init_images(s, ds, pre, torch.device("cpu"), lambda x, c: torch.zeros(len(x), dtype=torch.bool))


def test_the_whole_jobs_time_is_estimated_early(dpd, tmp_path):
    r = dpd("experts", "--num", "2", "--epochs", "3", "--out", tmp_path / "ex", *TINY)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("Estimated time for the whole job: about "))
    assert "(2 experts × 3 epochs; about" in lines[at] and lines[at - 1].startswith(
        "expert 0 epoch 1/3"
    )  # after the first epoch
    r = dpd("distill", "--experts", tmp_path / "ex", "--out", tmp_path / "run", *DISTILL, "--iterations", "6")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    (note,) = [line for line in lines if line.startswith("Estimated time for the whole job")]
    assert "(6 iterations; about" in note


def test_duration_wording():
    from dpd_cli.cli.console import duration

    assert [duration(s) for s in (40, 25 * 60, 3.5 * 3600, 60 * 3600)] == ["40 s", "25 min", "3.5 h", "2.5 days"]


@pytest.mark.parametrize(
    "extra,graphed,batch",
    [
        ({}, True, None),
        ({"batch_syn": 4}, True, 4),
        ({"batch_syn": 20}, True, None),
        ({"cuda_graphs": False}, False, None),
        ({"prune_mask": "ema"}, False, None),
        ({"prune_mode": "network"}, False, None),
    ],
)
def test_which_runs_would_replay_cuda_graphs(experts, tmp_path, extra, graphed, batch):
    """On a GPU (the device is only pretended here: building the runner touches no GPU) graphs serve stateless runs."""
    from dpd_cli.config.settings import resolve
    from dpd_cli.core.graphs import GraphedMetaGradient
    from dpd_cli.events import Message
    from dpd_cli.recipes.distill import DistillRecipe

    s = resolve(
        "distill",
        {
            "experts": str(experts),
            "ipc": 2,
            "syn_steps": 3,
            "prune_ratio": 0.05,
            "device": "cpu",
            "iterations": 2,
            "max_start_epoch": 2,
            "expert_epochs": 1,
            "out": str(tmp_path / "run"),
            "force": True,
            **_tiny(),
            **extra,
        },
    )
    events = []
    with DistillRecipe(s, SimpleNamespace(emit=events.append, close=lambda: None)) as recipe:
        assert recipe.graphed is None  # the CPU never captures
        recipe.device = torch.device("cuda")
        events.clear()
        runner = recipe._graphed()
    notes = [e.text for e in events if isinstance(e, Message)]
    if graphed:
        assert isinstance(runner, GraphedMetaGradient) and not notes
        assert runner.inputs.index is None if batch is None else runner.inputs.index.shape == (3, batch)
        assert runner.images is recipe.state.images and runner.lr is recipe.state.lr  # updated in place by the run
    else:
        assert runner is None
        assert notes == (
            []
            if extra.get("cuda_graphs") is False
            else [
                "CUDA graphs not used (--prune-mask ema and --prune-mode network carry state across iterations); "
                "each iteration runs eagerly."
            ]
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("memory", ["full", "low", "low2"])
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_no_host_sync_inside_a_cuda_iteration(experts, tmp_path, memory, cuda_graphs):
    """An iteration never makes the host wait for the GPU (the metrics flush, once per window, may), graphed or not."""
    from dpd_cli.config.settings import resolve
    from dpd_cli.recipes.distill import DistillRecipe

    s = resolve(
        "distill",
        {
            "experts": str(experts),
            "ipc": 2,
            "syn_steps": 3,
            "memory": "low" if memory == "low2" else memory,
            "keep_graphs": 2 if memory == "low2" else 0,
            "prune_ratio": 0.05,
            "cuda_graphs": cuda_graphs,
            "device": "cuda",
            "iterations": 10,
            "max_start_epoch": 2,
            "expert_epochs": 1,
            "lr_img": 10,
            "lr_lr": 1e-8,
            "log_every": 10,
            "checkpoint_every": 1000,
            "out": str(tmp_path / "run"),
            "force": True,
            **_tiny(),
        },
    )
    with DistillRecipe(s) as recipe:
        recipe.step()  # warm-up: first-touch allocations and library handles (and the graph's capture)
        recipe.flush()
        assert (recipe.graphed is not None and recipe.graphed.enabled) == cuda_graphs
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                recipe.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        recipe.flush()


def _tiny() -> dict:
    """TINY's command-line flags as settings (name -> value)."""
    out, args = {}, list(TINY)
    while args:
        flag = args.pop(0).lstrip("-").replace("-", "_")
        out[flag] = args.pop(0) if args and not args[0].startswith("--") else True
    return out


def test_too_large_an_image_step_is_warned_about(dpd, experts, tmp_path):
    """A huge --lr-img: the loss rises over the first iterations and the images' scale explodes; each said once."""
    big = [*DISTILL, "--iterations", "8", "--lr-img", "100000"]
    r = dpd("distill", "--experts", experts, "--out", tmp_path / "big", *big)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert out.count("Warning: Iteration ") == 2, out
    assert "Warning: Iteration 6: the matching loss rose: median " in out and "at iteration 1 (the real images)" in out
    assert "Warning: Iteration 1: the images' scale exploded: their std is " in out
    assert "try a smaller --lr-img (e.g. 10000, a tenth of 100000)" in out
    records = [json.loads(line) for line in (tmp_path / "big" / "metrics.jsonl").read_text().splitlines()]
    initial = float(load_synthetic(layout.checkpoint_path(tmp_path / "big", 0))[0]["images"].std())
    assert all(rec["image_std"] > 5 * initial for rec in records)  # the images' std, logged every iteration
    # A resume keeps what was said (in the checkpoint) and does not say it again.
    r = dpd("distill", "--experts", experts, "--out", tmp_path / "big", *big, "--iterations", "10", "--resume")
    assert r.exit_code == 0 and "Warning" not in r.output, r.output
    assert len(load_synthetic(tmp_path / "big" / "synthetic.safetensors")[1]["warnings"]) == 2
    data = json.loads(dpd("distill", "--experts", experts, "--out", tmp_path / "big2", *big, "--json").stdout)
    assert [w.split(":")[0] for w in data["warnings"]] == ["Iteration 1", "Iteration 6"]
    # The step size the tests distil with warns about nothing.
    r = dpd("distill", "--experts", experts, "--out", tmp_path / "ok", *DISTILL, "--iterations", "8", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["warnings"] == [] and "Warning" not in r.output


def _images(run: Path, iteration: int) -> torch.Tensor:
    return load_synthetic(layout.checkpoint_path(run, iteration))[0]["images"].double()


def test_clip_img_caps_the_step_and_grad_norm_is_the_gradients_norm(dpd, experts, tmp_path):
    """One iteration from zero momentum moves the images by lr_img * g: |step| = lr_img * grad_norm unclipped,
    lr_img * C clipped at a C below it, and a C above it changes nothing."""
    args = ["distill", "--experts", experts, *DISTILL, "--iterations", "1", "--checkpoint-every", "1"]
    assert dpd(*args, "--out", tmp_path / "plain").exit_code == 0
    grad_norm = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
    runs = {c: tmp_path / f"clip{c}" for c in (grad_norm / 4, grad_norm * 4)}
    for c, run in runs.items():
        assert dpd(*args, "--out", run, "--clip-img", c).exit_code == 0
    runs[0] = tmp_path / "plain"
    step = {c: (_images(run, 1) - _images(run, 0)).norm().item() for c, run in runs.items()}
    assert step[0] == pytest.approx(10 * grad_norm, rel=1e-3)
    assert step[grad_norm / 4] == pytest.approx(10 * grad_norm / 4, rel=1e-3)
    assert torch.equal(_images(runs[grad_norm * 4], 1), _images(runs[0], 1))


def test_lr_img_warmup_equals_a_run_resumed_at_the_full_step(dpd, experts, tmp_path):
    """--lr-img-warmup 2 steps at lr_img/2, then lr_img: the same images as one iteration at --lr-img 5 resumed at
    --lr-img 10 (the momentum buffer carried by the checkpoint)."""
    base = ["distill", "--experts", experts, *DISTILL, "--checkpoint-every", "1", "--keep-checkpoints", "all"]
    warm, manual = tmp_path / "warm", tmp_path / "manual"
    assert dpd(*base, "--out", warm, "--iterations", "3", "--lr-img-warmup", "2").exit_code == 0
    assert dpd(*base, "--out", manual, "--iterations", "1", "--lr-img", "5").exit_code == 0
    r = dpd(*base, "--out", manual, "--iterations", "3", "--lr-img", "10", "--resume")
    assert r.exit_code == 0, r.output
    for it in (1, 2, 3):
        assert torch.allclose(_images(warm, it), _images(manual, it), rtol=0, atol=1e-6)
    assert not torch.allclose(_images(warm, 1), _images(tmp_path / "manual", 0))
    shown = dpd("inspect", warm)
    assert "lr-img-warmup 2, seed 0" in " ".join(shown.output.split()), shown.output
