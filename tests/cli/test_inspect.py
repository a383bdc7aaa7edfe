"""``dpd inspect`` on a run directory, an experts folder and single files, through the CLI."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dpd_cli import interrupt
from dpd_cli.events import DistillIteration
from dpd_cli.io import storage
from tests.cli.conftest import user_error
from tests.helpers import StopWhen, assert_close, make_image_folder

_DISTILL = {
    "width": 4,
    "depth": 2,
    "ipc": 1,
    "iterations": 3,
    "syn_steps": 2,
    "max_start_epoch": 1,
    "train_per_class": 20,
    "lr_img": 10,
    "prune_ratio": 0.05,
    "threads": 1,
}

#: Five evaluations; the first is superseded by the third (same source, model and protocol).
EVAL = {
    "format": "dpd.eval",
    "format_version": 1,
    "results": [
        {
            "source": "distilled",
            "model": "convnet",
            "protocol": "fixed",
            "epochs": 300,
            "lr": 0.01,
            "runs": 3,
            "accuracies": [0.5, 0.52, 0.51],
            "mean": 0.51,
            "std": 0.008,
            "seeds": [1, 2, 3],
            "ipc": 1,
            "dataset": "fashion-mnist-mini",
            "iteration": 2,
            "timestamp": "2026-01-01T00:00:00",
        },
        {
            "source": "random",
            "model": "convnet",
            "protocol": "fixed",
            "epochs": 300,
            "lr": 0.01,
            "runs": 3,
            "accuracies": [0.40, 0.42, 0.41],
            "mean": 0.41,
            "std": 0.008,
            "seeds": [1, 2, 3],
            "ipc": 1,
            "dataset": "fashion-mnist-mini",
            "iteration": 3,
            "timestamp": "2026-01-02T00:00:00",
        },
        {
            "source": "distilled",
            "model": "convnet",
            "protocol": "fixed",
            "epochs": 300,
            "lr": 0.01,
            "runs": 3,
            "accuracies": [0.71, 0.70, 0.72],
            "mean": 0.71,
            "std": 0.00816,
            "seeds": [1, 2, 3],
            "ipc": 1,
            "dataset": "fashion-mnist-mini",
            "iteration": 3,
            "timestamp": "2026-01-02T00:00:00",
        },
        {
            "source": "full",
            "model": "convnet",
            "protocol": "fixed",
            "epochs": 20,
            "lr": 0.01,
            "runs": 1,
            "accuracies": [0.85],
            "mean": 0.85,
            "std": 0.0,
            "seeds": [1],
            "ipc": 1,
            "dataset": "fashion-mnist-mini",
            "iteration": 3,
            "timestamp": "2026-01-02T00:00:00",
        },
        {
            "source": "distilled",
            "model": "resnet18",
            "protocol": "mtt",
            "epochs": 1000,
            "lr": 0.007,
            "runs": 2,
            "accuracies": [0.61, 0.63],
            "mean": 0.62,
            "std": 0.01,
            "seeds": [1, 2],
            "ipc": 1,
            "dataset": "fashion-mnist-mini",
            "iteration": 3,
            "timestamp": "2026-01-02T00:00:00",
        },
    ],
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Two tiny experts, a finished 3-iteration run with an eval.json, and a run stopped at 2 of 5."""
    from dpd_cli.config.settings import resolve
    from dpd_cli.recipes import distill, experts

    tmp = tmp_path_factory.mktemp("inspect")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (
            ("DPD_EXPERTS_ROOT", "experts-root"),
            ("DPD_DATA_ROOT", "data-root"),
            ("DPD_CACHE_ROOT", "cache-root"),
        ):
            mp.setenv(var, str(tmp / sub))
        torch.manual_seed(0)
        experts.run(
            resolve(
                "experts",
                {
                    "num": 2,
                    "epochs": 3,
                    "width": 4,
                    "depth": 2,
                    "train_per_class": 20,
                    "out": tmp / "ex",
                    "dsa": False,
                    "threads": 1,
                },
            )
        )
        distill.run(resolve("distill", {**_DISTILL, "experts": tmp / "ex", "out": tmp / "run"}))
        (tmp / "run" / "eval.json").write_text(json.dumps(EVAL))
        try:
            distill.run(
                resolve(
                    "distill",
                    {**_DISTILL, "iterations": 5, "prune_ratio": 0.0, "experts": tmp / "ex", "out": tmp / "stopped"},
                ),
                StopWhen(lambda e: isinstance(e, DistillIteration) and e.iteration == 2),
            )
        except interrupt.Interrupted:
            pass
        finally:
            interrupt.clear()
    return {"experts": tmp / "ex", "run": tmp / "run", "stopped": tmp / "stopped"}


def _ok(result) -> None:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def _copy_run(built, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(built["run"], run, ignore=shutil.ignore_patterns(".lock"))
    return run


# --- run directory ----------------------------------------------------------------------------
def test_run_text_shows_key_facts(dpd, built):
    r = dpd("inspect", built["run"])
    _ok(r)
    out = " ".join(r.output.split())  # undo Rich's wrapping
    for phrase in (
        "Run directory",
        "fashion-mnist-mini, 10 images (1 per class, 1×28×28)",
        "convnet-w4-d2-instance-avg",
        "ratio 0.05, scope global, criterion abs",
        "finished (3/3 iterations)",
        "loss",
        "(start 0.01)",
        "Pruning by layer",
        "fc.weight",
        "71.00 ± 0.82 (3)",
        "41.00 ± 0.80 (3)",
        "85.00 (1 network)",
        "62.00 ± 1.00 (2)",
        "eval.json holds 1 older one",
        "synthetic.safetensors",
        "checkpoints/ckpt-000003.safetensors",
    ):
        assert phrase in out, phrase
    assert "INVALID" not in out and "Warnings" not in out
    assert max(len(line) for line in r.output.splitlines()) <= 80


def test_run_json(dpd, built):
    r = dpd("inspect", built["run"], "--json")
    _ok(r)
    data = json.loads(r.stdout)
    assert data["kind"] == "run" and data["exports"] == {}
    assert data["state"] == {
        "status": "finished",
        "holder": None,
        "iteration": 3,
        "iterations": 3,
        "synthetic_iteration": 3,
        "checkpoint_iteration": 3,
        "metrics_iteration": 3,
    }
    assert data["settings"]["ipc"] == 1 and data["settings"]["prune_ratio"] == 0.05
    metrics = [json.loads(x) for x in (built["run"] / "metrics.jsonl").read_text().splitlines()]
    assert data["loss"]["values"] == [m["loss"] for m in metrics]
    assert data["loss"]["min"] == min(m["loss"] for m in metrics)
    assert data["alpha"]["last"] == metrics[-1]["lr"]
    assert data["synthetic"]["n_images"] == 10

    # Per-layer statistics match the counter: mean % = layer count sum / (layer size x pruned iterations).
    pruning = data["pruning"]
    counts, meta = storage.load_tensors(built["run"] / "prune_frequency.safetensors", "dpd.prune_counts")
    assert pruning["iterations_pruned"] == meta["iterations_pruned"] == 3
    sizes = [int(torch.tensor(shape).prod()) if shape else 1 for _, shape in meta["layout"]]
    by_name = dict(zip([n for n, _ in meta["layout"]], torch.split(counts["counts"].long(), sizes), strict=True))
    for layer in pruning["layers"]:
        seg = by_name[layer["name"]]
        assert layer["size"] == seg.numel() and layer["pruned"] == int(seg.sum())
        assert_close(layer["mean_pct"], 100 * int(seg.sum()) / (seg.numel() * 3), rtol=1e-12)
    means = [layer["mean_pct"] for layer in pruning["layers"]]
    assert means == sorted(means, reverse=True) and means[0] > 0
    assert len(pruning["layers"]) == len(meta["layout"])
    # Global pruning drops ceil(rho * P) parameters per iteration.
    assert_close(pruning["overall_pct"], 100 * -(-0.05 * pruning["n_params"] // 1) / pruning["n_params"], rtol=1e-9)

    ev = data["evaluation"]
    assert ev["n_entries"] == 5
    latest = {(e["source"], e["model"], e["protocol"]): e for e in ev["results"]}
    assert set(latest) == {
        ("distilled", "convnet", "fixed"),
        ("random", "convnet", "fixed"),
        ("full", "convnet", "fixed"),
        ("distilled", "resnet18", "mtt"),
    }
    assert (
        latest["distilled", "convnet", "fixed"]["mean"] == 0.71 and latest["distilled", "convnet", "fixed"]["runs"] == 3
    )
    files = {f["name"]: f for f in data["files"]}
    assert (
        files["synthetic.safetensors"]["valid"] is True and files["synthetic.safetensors"]["format"] == "dpd.synthetic"
    )
    assert all(f["valid"] is not False for f in data["files"]), data["files"]
    assert data["warnings"] == []


def test_stopped_run_is_resumable(dpd, built):
    r = dpd("inspect", built["stopped"], "--json")
    _ok(r)
    data = json.loads(r.stdout)
    assert data["state"]["status"] == "resumable"
    assert (data["state"]["iteration"], data["state"]["iterations"], data["state"]["checkpoint_iteration"]) == (2, 5, 2)
    assert data["pruning"]["iterations_pruned"] == 0 and data["evaluation"] is None
    r = dpd("inspect", built["stopped"])
    _ok(r)
    text = " ".join(r.output.split())
    assert "stopped at 2/5 iterations; resumable from checkpoint 2" in text
    assert "ratio 0: no pruning (plain MTT)" in text and "No iteration pruned anything yet" in text


def test_corrupt_files_in_a_run_are_reported_not_fatal(dpd, built, tmp_path):
    run = _copy_run(built, tmp_path)
    syn = run / "synthetic.safetensors"
    syn.write_bytes(syn.read_bytes()[:-100])
    (run / "grid.png").write_bytes(b"not a png")
    (run / "eval.json").write_text('{"format": "other"}')
    r = dpd("inspect", run, "--json")
    _ok(r)
    data = json.loads(r.stdout)
    files = {f["name"]: f for f in data["files"]}
    assert files["synthetic.safetensors"]["valid"] is False
    assert "synthetic.safetensors is truncated or padded" in files["synthetic.safetensors"]["error"]
    assert files["grid.png"]["valid"] is False and files["eval.json"]["valid"] is False
    assert files["prune_frequency.safetensors"]["valid"] is True
    # The state falls back on the checkpoint.
    assert data["synthetic"] is None and data["state"]["status"] == "finished"
    r = dpd("inspect", run)
    _ok(r)
    assert "INVALID" in r.output and "Warnings (3)" in r.output


# --- experts folder ---------------------------------------------------------------------------
def test_experts_json(dpd, built):
    r = dpd("inspect", built["experts"], "--json")
    _ok(r)
    data = json.loads(r.stdout)
    assert data["kind"] == "experts" and data["count"] == 2 and data["n_compatible"] == 2
    assert (
        data["dataset"] == "fashion-mnist-mini"
        and data["epochs"] == 3
        and data["model_tag"] == "convnet-w4-d2-instance-avg"
    )
    trajectories = []
    for e in data["experts"]:
        tf = storage.TensorFile(built["experts"] / e["file"], "dpd.trajectory")
        assert e["final_test_accuracy"] == tf.meta["test_accuracy"][-1]
        trajectories.append(tf.get("trajectory").double())
    assert data["n_params"] == trajectories[0].shape[1]
    assert_close(data["accuracy"]["mean"], sum(e["final_test_accuracy"] for e in data["experts"]) / 2, rtol=1e-12)
    d = data["distance"]
    assert d["m"] == 2 and d["t"] == [0, 1] and d["n_experts"] == 2
    expected = [sum(float((t[s] - t[s + 2]).norm()) for t in trajectories) / 2 for s in (0, 1)]
    assert_close(d["values"], expected, rtol=1e-9)
    assert data["warnings"] == []

    r = dpd("inspect", built["experts"], "--json", "--expert-epochs", "1")
    _ok(r)
    assert json.loads(r.stdout)["distance"]["t"] == [0, 1, 2]


def test_experts_text_and_warnings(dpd, built, tmp_path):
    r = dpd("inspect", built["experts"])
    _ok(r)
    for phrase in (
        "Experts folder",
        "convnet-w4-d2-instance-avg",
        "final test accuracy",
        "Parameter distance",
        "expert_00000.safetensors",
        "expert_00001.safetensors",
    ):
        assert phrase in r.output, phrase

    folder = tmp_path / "ex"
    shutil.copytree(built["experts"], folder, ignore=shutil.ignore_patterns(".lock"))
    (folder / "experts.json").unlink()
    (folder / "expert_00002.safetensors").write_bytes((folder / "expert_00000.safetensors").read_bytes()[:-100])
    r = dpd("inspect", folder, "--json")
    _ok(r)
    data = json.loads(r.stdout)
    assert data["count"] == 3 and data["n_valid"] == 2 and data["distance"]["n_experts"] == 2
    text = " ".join(data["warnings"])
    assert "experts.json is missing" in text and "expert_00002.safetensors is truncated" in text


def test_image_folder_experts_are_usable(dpd, tmp_path):
    # experts.json keys image folders by folder name ("imagefolder-<name>"); the files say "imagefolder"
    root = make_image_folder(tmp_path / "pets", per_split=(4, 2))
    out = tmp_path / "ex-pets"
    _ok(
        dpd(
            "experts",
            "--dataset",
            "imagefolder",
            "--data-dir",
            root,
            "--num",
            "2",
            "--epochs",
            "1",
            "--width",
            "4",
            "--depth",
            "1",
            "--batch",
            "4",
            "--threads",
            "1",
            "--out",
            out,
            "--quiet",
        )
    )
    r = dpd("inspect", out, "--json", "--expert-epochs", "1")
    _ok(r)
    data = json.loads(r.stdout)
    assert data["dataset"] == "imagefolder-pets"
    assert data["n_compatible"] == 2 and data["warnings"] == []


# --- single files -----------------------------------------------------------------------------
def test_single_files(dpd, built):
    r = dpd("inspect", built["experts"] / "expert_00000.safetensors")
    _ok(r)
    for phrase in (
        "dpd.trajectory version 1",
        "trajectory",
        "F32",
        "Metadata",
        "test_accuracy",
        "--json shows them in full",
    ):
        assert phrase in r.output, phrase

    r = dpd("inspect", built["run"] / "synthetic.safetensors", "--json")
    _ok(r)
    data = json.loads(r.stdout)
    assert data["kind"] == "file" and data["format"] == "dpd.synthetic" and data["valid"] is True
    assert {t["name"]: t["shape"] for t in data["tensors"]}["images"] == [10, 1, 28, 28]
    assert data["metadata"]["settings"]["ipc"] == 1  # complete in JSON, cut in the terminal
    assert data["details"]["n_images"] == 10 and data["part_of"]["kind"] == "run"

    r = dpd("inspect", built["run"] / "checkpoints" / "ckpt-000003.safetensors", "--json")
    _ok(r)
    data = json.loads(r.stdout)
    assert data["format"] == "dpd.checkpoint" and data["part_of"] == {"kind": "run", "path": str(built["run"])}


# --- outputs ----------------------------------------------------------------------------------
def test_export_grid_writes_png(dpd, built, tmp_path):
    from PIL import Image

    out = (
        tmp_path / "syn.png"
    )  # in an existing folder: a missing one is refused (test_image_outputs_need_an_existing_folder)
    r = dpd("inspect", built["run"], "--export-grid", out)
    _ok(r)
    text = " ".join(r.output.split())  # the message wraps at the terminal width, where depends on the path's length
    assert "Wrote" in text and "10 images from synthetic.safetensors" in text
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "L"
        assert im.size == (2 * (28 + 4), 2 * (10 * 30 + 2))  # 1 per class, 10 rows, 2 px padding, 2x scale


def test_plot_writes_png(dpd, built, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plot.png"
    r = dpd("inspect", built["run"], "--plot", out, "--json")
    _ok(r)
    assert json.loads(r.stdout)["exports"]["plot"] == {"path": str(out)}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_auser_error(dpd, built, tmp_path, monkeypatch):
    # An entry of None in sys.modules makes `import matplotlib...` raise ImportError, as if it were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    r = dpd("inspect", built["experts"], "--plot", tmp_path / "none.png", "--json")
    user_error(r, '--plot needs matplotlib, which is not installed. Install it with `pip install "dpd-cli[plot]"`')
    assert r.stdout == "" and "DPD_DEBUG" not in r.output
    assert not (tmp_path / "none.png").exists()


def test_image_outputs_need_an_existing_folder(dpd, built, tmp_path):
    for flag in ("--export-grid", "--plot"):
        out = tmp_path / "no" / "such" / "g.png"
        r = dpd("inspect", built["run"], flag, out)
        user_error(r, f"{flag} {out}: the folder {out.parent} does not exist. Create it first")
        assert not (tmp_path / "no").exists()


# --- errors -----------------------------------------------------------------------------------
def test_truncated_synthetic_file_is_auser_error(dpd, built, tmp_path):
    run = _copy_run(built, tmp_path)
    syn = run / "synthetic.safetensors"
    syn.write_bytes(syn.read_bytes()[:-100])
    r = dpd("inspect", syn)
    user_error(
        r,
        "synthetic.safetensors is truncated or padded",
        "Rerun `dpd distill` with --resume",
        f"`dpd inspect {run}` shows the rest of the run.",
    )


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (bytes(range(256)) * 4, "is not a valid safetensors file (header length"),  # random bytes
        (b"", "is empty or truncated (0 bytes): not a safetensors file."),
    ],
)
def test_non_safetensors_files_are_user_errors(dpd, tmp_path, content, phrase):
    path = tmp_path / "thing.safetensors"
    path.write_bytes(content)
    user_error(dpd("inspect", path), phrase, "`dpd inspect` reads a run directory")


def test_a_torch_file_points_to_experts_import(dpd, tmp_path):
    import torch

    for name in ("replay_buffer_0.pt", "legacy.pt"):  # torch.save's zip, and its pickle before PyTorch 1.6
        torch.save([[torch.zeros(3)]], tmp_path / name, _use_new_zipfile_serialization=name != "legacy.pt")
        user_error(
            dpd("inspect", tmp_path / name),
            f"{tmp_path / name} is a PyTorch file (torch.save), not a safetensors file:",
            f"replay buffer (replay_buffer_N.pt), convert its experts with `dpd experts import {tmp_path / name} "
            "--dataset NAME --zca` (or --no-zca)",
        )


def test_a_safetensors_file_of_another_tool_lists_its_tensors(dpd, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3, 4), "b": torch.ones(2)}, tmp_path / "other.safetensors", metadata={"by": "x"})
    r = dpd("inspect", tmp_path / "other.safetensors")
    _ok(r)
    out = " ".join(r.output.split())
    assert "format a safetensors file not written by dpd (no dpd format metadata)" in out and "None" not in out
    assert "Tensors (2)" in out and "w F32 3×4 48 B" in out and "b F32 2 8 B" in out and "by x" in out
    data = json.loads(dpd("inspect", tmp_path / "other.safetensors", "--json").stdout)
    assert (data["kind"], data["format"], data["valid"]) == ("file", None, True)


def test_an_export_folder_is_described(dpd, built, tmp_path):
    out = tmp_path / "exp"
    _ok(dpd("export", built["run"], "--format", "datm", "--out", out))
    r = dpd("inspect", out)
    _ok(r)
    text = " ".join(r.output.split())
    for phrase in (
        f"Export folder {out} (dpd export --format datm)",
        "images 10 images (1 per class, 10 classes, 1×28×28)",
        "labels hard, as float32 [n, K] logits (0 at the class, -1000 elsewhere)",
        f"source {(built['run'] / 'synthetic.safetensors').resolve()}",
        "images_best.pt",
        "lr_best.pt",
        "README.txt says how to load them.",
    ):
        assert phrase in text, phrase
    (out / "lr_best.pt").unlink()
    data = json.loads(dpd("inspect", out, "--json").stdout)
    assert (data["kind"], data["format"], data["n_images"], data["image_shape"]) == ("export", "datm", 10, [1, 28, 28])
    assert data["warnings"] == ["lr_best.pt is missing: the folder was changed after `dpd export` wrote it."]
    user_error(dpd("inspect", out / "images_best.pt"), f"It belongs to a `dpd export` folder: `dpd inspect {out}`")
    user_error(dpd("inspect", out, "--plot", tmp_path / "p.png"), "is an export folder (from `dpd export`)")


def test_diverged_runs_shown_and_malformed_ones_ignored(dpd, built, tmp_path):
    run = _copy_run(built, tmp_path)
    ev = json.loads(json.dumps(EVAL))
    ev["results"][1]["diverged_runs"] = [2, "x", True]  # one real run index among junk
    ev["results"][2]["diverged_runs"] = "not a list"
    (run / "eval.json").write_text(json.dumps(ev))
    r = dpd("inspect", run)
    _ok(r)
    out = " ".join(r.output.split())
    assert "41.00 ± 0.80 (3)*" in out and "71.00 ± 0.82 (3) " in out
    # The note is the one `dpd evaluate` prints (dpd_cli.cli.results): which trainings, at which lr.
    assert "* 1 of 9 trainings diverged (training loss became NaN/Inf): random real / convnet run 2 (lr 0.01)." in out
    assert max(len(line) for line in r.output.splitlines()) <= 80
    data = json.loads(dpd("inspect", run, "--json").stdout)
    assert [e["diverged_runs"] for e in data["evaluation"]["results"] if e["source"] == "random"] == [[2]]


def test_json_files_point_to_what_inspect_reads(dpd, built, tmp_path):
    user_error(
        dpd("inspect", built["run"] / "eval.json"),
        "eval.json is a JSON file (plain text: open it directly)",
        f"`dpd inspect {built['run']}` shows the rest of the run.",
    )
    shutil.copy(built["run"] / "synthetic.safetensors", tmp_path / "best.safetensors")
    (tmp_path / "best.eval.json").write_text(json.dumps(EVAL))
    user_error(
        dpd("inspect", tmp_path / "best.eval.json"),
        f"`dpd inspect {tmp_path / 'best.safetensors'}` shows this evaluation with the set it scores.",
    )


def test_missing_path_and_foreign_folder(dpd, built, tmp_path):
    user_error(dpd("inspect", tmp_path / "nope"), "nope does not exist.")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    user_error(dpd("inspect", tmp_path / "notes"), "is neither a run directory", "It holds a.txt.")
    user_error(
        dpd("inspect", built["run"].parent),
        "is neither a run directory nor an experts folder, but it contains:",
        f"{built['run']} (run)",
        f"{built['experts']} (experts folder)",
    )


def test_flag_errors(dpd, built, tmp_path):
    user_error(dpd("inspect", built["experts"], "--export-grid", tmp_path / "g.png"), "is an experts folder")
    user_error(
        dpd("inspect", built["run"] / "synthetic.safetensors", "--plot", tmp_path / "p.png"),
        "--plot draws a run directory or an experts folder",
    )
    user_error(dpd("inspect", built["run"], "--export-grid", tmp_path / "g.jpg"), "give a file name ending in .png")
