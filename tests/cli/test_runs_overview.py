"""Runs as a collection: ``dpd ls``, ``dpd compare``, the JSON envelope, and ``dpd inspect``'s cross-file checks."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from dpd_cli import __version__, interrupt
from dpd_cli.events import ExpertDone
from dpd_cli.io import storage
from tests.cli.conftest import user_error
from tests.helpers import StopWhen

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
_EXPERTS = {"epochs": 3, "width": 4, "depth": 2, "train_per_class": 20, "dsa": False, "threads": 1}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """An experts folder whose second `dpd experts` run planned 5 and stopped at 3; runs A (rho 0.05) and B (rho 0)."""
    from dpd_cli.config.settings import resolve
    from dpd_cli.recipes import distill, experts

    tmp = tmp_path_factory.mktemp("overview")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (
            ("DPD_EXPERTS_ROOT", "experts-root"),
            ("DPD_DATA_ROOT", "data-root"),
            ("DPD_CACHE_ROOT", "cache-root"),
        ):
            mp.setenv(var, str(tmp / sub))
        torch.manual_seed(0)
        experts.run(resolve("experts", {**_EXPERTS, "num": 2, "out": tmp / "ex"}))
        try:
            experts.run(
                resolve("experts", {**_EXPERTS, "num": 5, "out": tmp / "ex"}),
                StopWhen(lambda e: isinstance(e, ExpertDone) and e.index == 2),
            )
        except interrupt.Interrupted:
            pass
        finally:
            interrupt.clear()
        distill.run(resolve("distill", {**_DISTILL, "experts": tmp / "ex", "out": tmp / "runs" / "a"}))
        distill.run(
            resolve("distill", {**_DISTILL, "prune_ratio": 0.0, "experts": tmp / "ex", "out": tmp / "runs" / "b"})
        )
    return {"root": tmp, "experts": tmp / "ex", "a": tmp / "runs" / "a", "b": tmp / "runs" / "b"}


def _ok(result) -> None:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _entry(model: str, accuracies: list[float], seeds: list[int], iteration: int = 3, **extra) -> dict:
    mean = sum(accuracies) / len(accuracies)
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / len(accuracies))
    return {
        "source": "distilled",
        "model": model,
        "protocol": "fixed",
        "epochs": 300,
        "lr": 0.01,
        "runs": len(accuracies),
        "accuracies": accuracies,
        "mean": mean,
        "std": std,
        "seeds": seeds,
        "ipc": 1,
        "dataset": "fashion-mnist-mini",
        "iteration": iteration,
        "select": "final",
        "selected_iteration": iteration,
        **extra,
    }


def _write_eval(run: Path, *entries: dict) -> None:
    (run / "eval.json").write_text(json.dumps({"format": "dpd.eval", "format_version": 1, "results": list(entries)}))


# --- the JSON envelope ------------------------------------------------------------------------
def test_every_json_output_has_the_envelope(dpd, built, tmp_path):
    run = _copy(built["a"], tmp_path / "run")
    ex = _copy(built["experts"], tmp_path / "ex")
    outputs = {
        "experts": dpd(
            "experts",
            "--num",
            "3",
            "--epochs",
            "3",
            "--width",
            "4",
            "--depth",
            "2",
            "--train-per-class",
            "20",
            "--no-dsa",
            "--threads",
            "1",
            "--out",
            ex,
            "--json",
        ),
        "distill": dpd(
            "distill",
            "--experts",
            ex,
            "--out",
            run,
            "--resume",
            "--json",
            *[f"--{k.replace('_', '-')}={v}" for k, v in _DISTILL.items()],
        ),
        "evaluate": dpd("evaluate", run, "--epochs", "1", "--runs", "1", "--threads", "1", "--json"),
        "inspect": dpd("inspect", run, "--json"),
        "ls": dpd("ls", tmp_path, "--json"),
        "compare": dpd("compare", run, "--json"),
    }
    for command, r in outputs.items():
        _ok(r)
        data = json.loads(r.stdout)
        assert (data["command"], data["dpd_version"], data["schema"]) == (command, __version__, 1), command
    # The payload sits beside the envelope, as before.
    assert json.loads(outputs["evaluate"].stdout)["passed"] is True
    assert json.loads(outputs["inspect"].stdout)["kind"] == "run"


def test_envelope_names_the_command_as_typed_and_keeps_its_keys():
    from dpd_cli.cli.console import json_envelope

    assert json_envelope("experts_import", {"folder": "x"}) == {
        "command": "experts import",
        "dpd_version": __version__,
        "schema": 1,
        "folder": "x",
    }
    with pytest.raises(ValueError, match="envelope's keys"):
        json_envelope("inspect", {"dpd_version": "0.0.1"})  # a payload may not shadow the envelope


def test_file_json_keeps_the_writers_version_apart(dpd, built):
    data = json.loads(dpd("inspect", built["a"] / "synthetic.safetensors", "--json").stdout)
    meta = storage.read_header(built["a"] / "synthetic.safetensors")[1]
    assert data["written_by"] == meta["dpd_version"] and data["dpd_version"] == __version__


# --- inspect: files that disagree, folders being written --------------------------------------
def test_inspect_flags_a_synthetic_set_older_than_the_newest_checkpoint(dpd, built, tmp_path):
    from dpd_cli.artifacts import synthetic as synthetic_file
    from dpd_cli.data import Preprocess

    run = _copy(built["a"], tmp_path / "run")
    t, meta = synthetic_file.load(run / "checkpoints" / "ckpt-000000.safetensors")  # the initial images, iteration 0
    synthetic_file.save_synthetic(
        run / "synthetic.safetensors",
        t["images"],
        t["labels"],
        t["lr"],
        Preprocess.from_tensors(t),
        {k: v for k, v in meta.items() if k not in ("format", "format_version", "dpd_version")},
    )
    data = json.loads(dpd("inspect", run, "--json").stdout)
    assert data["state"]["status"] == "finished" and data["state"]["synthetic_iteration"] == 0
    text = " ".join(data["warnings"])
    assert "synthetic.safetensors is at iteration 0, the newest checkpoint at 3" in text
    assert "Rerun the same `dpd distill` command with --resume" in text
    r = dpd("inspect", run)
    _ok(r)
    assert "Warnings (1)" in r.output


def test_inspect_flags_other_disagreements(dpd, built, tmp_path):
    run = _copy(built["a"], tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # iteration 2's line lost
    settings = json.loads((run / "settings.json").read_text())
    settings["settings_hash"] = "0" * 16
    (run / "settings.json").write_text(json.dumps(settings))
    _write_eval(run, _entry("convnet", [0.5, 0.6], [1, 2], iteration=2))
    text = " ".join(json.loads(dpd("inspect", run, "--json").stdout)["warnings"])
    assert "metrics.jsonl has no line for 1 of iterations 1-3" in text
    assert "record different settings (settings_hash: settings.json 0000000000000000" in text
    assert (
        "eval.json: the latest distilled results (convnet at iteration 2) are not for the run's newest iteration (3)"
        in text
    )


def test_inspect_reads_a_validation_selected_evaluation_as_current(dpd, built, tmp_path):
    # --select val reports an older checkpoint, but the evaluation trained on the newest one too: not stale.
    run = _copy(built["a"], tmp_path / "run")
    _write_eval(
        run,
        _entry(
            "convnet",
            [0.5, 0.6],
            [1, 2],
            iteration=0,
            select="val",
            checkpoints=[{"iteration": 0, "mean": 0.55}, {"iteration": 3, "mean": 0.5}],
        ),
    )
    assert json.loads(dpd("inspect", run, "--json").stdout)["warnings"] == []


def test_a_running_run_is_running_and_not_flagged(dpd, built, tmp_path):
    run = _copy(built["a"], tmp_path / "run")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")  # mid-write
    with storage.lock_dir(run, "a distillation run"):
        data = json.loads(dpd("inspect", run, "--json").stdout)
        listed = json.loads(dpd("ls", run, "--json").stdout)["entries"]
    assert data["state"]["status"] == "running" and data["warnings"] == []
    assert [(e["path"], e["state"]) for e in listed] == [(str(run), "running")]


def test_experts_folder_records_the_planned_count(dpd, built, tmp_path):
    manifest = json.loads((built["experts"] / "experts.json").read_text())
    assert manifest["n_planned"] == 5 and manifest["settings"]["num"] == 2  # the first run's settings stay
    data = json.loads(dpd("inspect", built["experts"], "--json").stdout)
    assert (data["count"], data["n_planned"], data["being_written"]) == (3, 5, False)
    text = " ".join(dpd("inspect", built["experts"]).output.split())
    assert "3 of 5 (stopped early: rerun the same `dpd experts` command to train the rest)" in text

    folder = _copy(built["experts"], tmp_path / "ex")
    with storage.lock_shard(folder, "experts", 0, 2):  # a torchrun rank holds the folder's lock shared
        data = json.loads(dpd("inspect", folder, "--json").stdout)
        text = " ".join(dpd("inspect", folder).output.split())
        listed = json.loads(dpd("ls", folder, "--json").stdout)["entries"]
    assert data["being_written"] is True
    assert "3 of 5, being written" in text
    assert listed[0]["state"] == "being written"


# --- ls ---------------------------------------------------------------------------------------
def test_ls_lists_runs_and_experts(dpd, built, tmp_path, monkeypatch):
    root = tmp_path / "work"
    _copy(built["a"], root / "runs" / "cifar" / "a")
    _copy(built["b"], root / "runs" / "b")
    _copy(built["experts"], root / "experts-root" / "fashion" / "convnet")
    _write_eval(
        root / "runs" / "b",
        _entry("convnet", [0.6, 0.7], [1, 2]),
        _entry(
            "convnet",
            [0.5, 0.52],
            [1, 2],
            select="val",
            selected_iteration=0,
            iteration=0,
            checkpoints=[{"iteration": 0}, {"iteration": 3}],
        ),
    )
    (root / "runs" / "notes").mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("DPD_EXPERTS_ROOT", str(root / "experts-root"))

    r = dpd("ls", "--json")  # the defaults: runs/ and the experts root
    _ok(r)
    data = json.loads(r.stdout)
    assert data["roots"] == ["runs", str(root / "experts-root")]
    by_path = {e["path"]: e for e in data["entries"]}
    assert set(by_path) == {"runs/b", "runs/cifar/a", str(root / "experts-root" / "fashion" / "convnet")}
    a, b = by_path["runs/cifar/a"], by_path["runs/b"]
    assert (a["kind"], a["dataset"], a["ipc"], a["prune_ratio"], a["prune_criterion"]) == (
        "run",
        "fashion-mnist-mini",
        1,
        0.05,
        "abs",
    )
    assert (a["iteration"], a["iterations"], a["state"], a["evaluation"], a["problems"]) == (3, 3, "finished", None, [])
    assert b["prune_ratio"] == 0 and b["evaluation"]["mean"] == pytest.approx(0.51)  # the entry appended last
    assert (b["evaluation"]["select"], b["evaluation"]["selected_iteration"]) == ("val", 0)
    ex = by_path[str(root / "experts-root" / "fashion" / "convnet")]
    finals = [
        storage.TensorFile(f, "dpd.trajectory").meta["test_accuracy"][-1]
        for f in sorted((root / "experts-root" / "fashion" / "convnet").glob("expert_*.safetensors"))
    ]
    assert (ex["kind"], ex["count"], ex["n_planned"], ex["epochs"], ex["state"]) == ("experts", 3, 5, 3, "incomplete")
    assert ex["accuracy"] == pytest.approx(sum(finals) / 3, rel=1e-12)

    r = dpd("ls")
    _ok(r)
    rows = [line for line in r.output.splitlines() if "runs/" in line or "convnet" in line and "experts-root" in line]
    assert len(rows) == 3  # one line each, whatever the terminal width
    row_b = next(line for line in rows if "runs/b" in line)
    assert "finished" in row_b and "51.00 ± 1.00 convnet (val@0)" in row_b
    assert "3 of 5" in next(line for line in rows if "experts-root" in line)


def test_ls_marks_problems_and_refuses_a_missing_folder(dpd, built, tmp_path):
    run = _copy(built["a"], tmp_path / "runs" / "a")
    (run / "synthetic.safetensors").write_bytes((run / "synthetic.safetensors").read_bytes()[:-10])
    data = json.loads(dpd("ls", tmp_path / "runs", "--json").stdout)
    assert any("synthetic.safetensors is truncated" in p for p in data["entries"][0]["problems"])
    r = dpd("ls", tmp_path / "runs")
    assert "! 1 folder has problems" in r.output
    user_error(dpd("ls", tmp_path / "nope"), "nope does not exist.")


# --- compare ----------------------------------------------------------------------------------
def test_compare_pairs_runs_evaluated_with_the_same_seeds(dpd, built, tmp_path):
    a, b = _copy(built["a"], tmp_path / "a"), _copy(built["b"], tmp_path / "b")
    acc_a, acc_b = [0.60, 0.62, 0.55], [0.64, 0.63, 0.61]
    _write_eval(a, _entry("convnet", acc_a, [7, 8, 9]), _entry("resnet18", [0.3, 0.4], [1, 2]))
    _write_eval(b, _entry("convnet", acc_b, [7, 8, 9]), _entry("resnet18", [0.35, 0.45], [3, 4]))
    r = dpd("compare", a, b, "--json")
    _ok(r)
    data = json.loads(r.stdout)
    assert [x["path"] for x in data["runs"]] == [str(a), str(b)]
    assert [x["prune_ratio"] for x in data["runs"]] == [0.05, 0]
    rows = {(x["model"], x["source"], x["protocol"]): x for x in data["rows"]}
    conv = rows["convnet", "distilled", "fixed"]
    assert [c["mean"] for c in conv["cells"]] == [pytest.approx(sum(acc_a) / 3), pytest.approx(sum(acc_b) / 3)]
    # The reference: differences network by network, sample sd, the textbook t quantile t(0.975, 2) = 4.303.
    diffs = [y - x for x, y in zip(acc_a, acc_b)]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = 4.302653 * sd / math.sqrt(3)
    d = conv["differences"][0]
    assert (d["run"], d["against"], d["paired"], d["n"]) == (1, 0, True, 3)
    assert d["mean"] == pytest.approx(mean, rel=1e-12) and d["sd"] == pytest.approx(sd, rel=1e-12)
    assert d["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-6)
    res = rows["resnet18", "distilled", "fixed"]["differences"][0]
    assert res["paired"] is False and "different network seeds" in res["reason"]

    r = dpd("compare", a, b)
    _ok(r)
    out = " ".join(r.output.split())
    assert "A runs/" not in out and f"A {a} fashion-mnist-mini, IPC 1, rho 0.05 (abs)" in out
    assert (
        f"B − A {100 * mean:+.2f} points, 95% interval [{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}]" in out
    )
    assert "(paired over 3 networks)" in out and "not paired: different network seeds" in out


def test_compare_errors(dpd, built, tmp_path):
    run = _copy(built["a"], tmp_path / "run")
    user_error(dpd("compare", run), "has not been evaluated", f"Run `dpd evaluate {run}` first.")
    user_error(dpd("compare", built["experts"]), "is an experts folder: it has no evaluations")
    user_error(dpd("compare", tmp_path / "nope"), "nope does not exist.")


def test_ls_with_nothing_to_list(dpd, tmp_path):
    r = dpd("ls")  # neither runs/ nor the experts root exist in the test's empty folder
    _ok(r)
    assert r.output.startswith("No runs or experts folders in runs/ and the experts root")
    assert json.loads(dpd("ls", "--json").stdout)["entries"] == []


# --- distillation that did not help -----------------------------------------------------------
def test_no_gain_is_said_by_evaluate_inspect_ls_and_compare(dpd, built, tmp_path, monkeypatch):
    """The initial images (checkpoint 0) beat the final set: every command says so, --fail-if-no-gain exits 3."""
    from dpd_cli.artifacts import layout
    from dpd_cli.artifacts.synthetic import load as load_synthetic
    from dpd_cli.recipes import evaluate as E

    run = _copy(built["a"], tmp_path / "runs" / "a")
    images = {layout.checkpoint_iteration(p): load_synthetic(p)[0]["images"] for p in layout.checkpoints(run)}
    assert sorted(images) == [0, 3]
    tests, seeds = {0: [0.80, 0.82], 3: [0.60, 0.61]}, []

    def fake(spec, xs, ys, x_test, y_test, epochs, lrs, s, seeds_, device, on_epoch, x_val=None, y_val=None):
        out = []
        for x, seed in zip(xs, seeds_, strict=True):
            it = next(i for i, ref in images.items() if torch.equal(ref, x))
            seeds.extend([seed] if seed not in seeds else [])
            out.append(E.TrainResult(tests[it][seeds.index(seed)], None, None))
        return out

    monkeypatch.setattr(E, "_train_and_test", fake)
    flags = ["--select", "test-max", "--epochs", "1", "--runs", "2", "--threads", "1"]
    r = dpd("evaluate", run, *flags)
    _ok(r)
    out = " ".join(r.output.split())
    assert "81.00 ± 1.00 (2)†!" in out
    assert "! convnet: distillation did not help: --select test-max chose checkpoint 0, the untouched initial" in out
    assert "Test accuracy (%) by iteration: 0: 81.00, 3: 60.50" in out and "try a smaller --lr-img (e.g. 1," in out
    r = dpd("evaluate", run, *flags, "--json")
    _ok(r)
    data = json.loads(r.stdout)
    ng = data["results"][0]["no_gain"]
    assert (ng["reason"], ng["initial"], ng["final"], data["no_gain"]) == ("selected_initial", 0.81, 0.605, ["convnet"])
    assert data["passed"] and data["warnings"] == [ng["message"]]
    assert json.loads((run / "eval.json").read_text())["results"][-1]["no_gain"] == ng
    r = dpd("evaluate", run, *flags, "--fail-if-no-gain")
    assert r.exit_code == 3, r.output
    assert "No gain from distillation (convnet; see the warning): --fail-if-no-gain." in r.output

    r = dpd("inspect", run)
    _ok(r)
    assert "distillation did not help" in " ".join(r.output.split())
    assert json.loads(dpd("inspect", run, "--json").stdout)["evaluation"]["results"][0]["no_gain"] == ng
    r = dpd("ls", tmp_path / "runs")
    _ok(r)
    assert "81.00 ± 1.00 convnet (test-max@0, optimistic, NO GAIN)" in r.output
    assert "NO GAIN: distillation did not help" in r.output
    assert json.loads(dpd("ls", tmp_path / "runs", "--json").stdout)["entries"][0]["evaluation"]["no_gain"] == ng
    other = _copy(built["b"], tmp_path / "b")
    _write_eval(other, _entry("convnet", [0.7, 0.71], [1, 2], protocol="mtt"))
    r = dpd("compare", run, other)
    _ok(r)
    out = " ".join(r.output.split())
    assert "A 81.00 ± 1.00 (2)†! checkpoint 0, chosen on the test set (optimistic)" in out
    assert "(optimistic), 1 epochs, evaluation loop v2, no gain: initial images 81.00" in out
    assert "! convnet: distillation did not help" in out
    cell = json.loads(dpd("compare", run, other, "--json").stdout)["rows"][0]["cells"][0]
    assert cell["no_gain"] == ng
