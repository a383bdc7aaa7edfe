"""End to end with MTT's formats: trained experts -> an MTT replay buffer -> dpd experts import -> dpd distill ->
dpd export -> the exported files loaded back -> dpd evaluate gives the same accuracy as on the original set.

The replay buffer is written here in MTT's list-of-lists form, splitting each trajectory row by the
parameter shapes of MTT's ConvNet (``tests.helpers.mtt_convnet``), not by dpd's layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpd_cli.artifacts.synthetic import load as load_synthetic
from dpd_cli.io import storage
from tests.cli.conftest import TINY
from tests.helpers import mtt_convnet

# The imported folder knows nothing of --train-per-class (MTT's experts saw the whole training set).
NET = ["--width", "8", "--depth", "2", "--threads", "1"]
DISTILL = [
    "--ipc",
    "1",
    "--iterations",
    "3",
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
    "3",
]
EVAL = ["--epochs", "4", "--runs", "2", "--json", "--threads", "1", "--seed", "3"]


def _as_mtt_buffer(experts: Path) -> list:
    """The folder's trajectories as MTT's buffer.py saves them: [expert][snapshot][parameter tensors]."""
    shapes = [p.shape for p in mtt_convnet(1, 10, 8, 2, (28, 28)).parameters()]
    buffer = []
    for f in sorted(experts.glob("expert_*.safetensors")):
        trajectory = storage.load_tensors(f, "dpd.trajectory")[0]["trajectory"]
        snapshots = []
        for row in trajectory:
            parts = list(torch.split(row, [s.numel() for s in shapes]))
            snapshots.append([part.reshape(s).clone() for part, s in zip(parts, shapes, strict=True)])
        buffer.append(snapshots)
    return buffer


@pytest.fixture
def imported(dpd, tmp_path) -> Path:
    assert dpd("experts", "--num", "2", "--epochs", "3", "--out", tmp_path / "trained", *TINY).exit_code == 0
    buffers = tmp_path / "buffers" / "FashionMNIST_NO_ZCA" / "ConvNet"
    buffers.mkdir(parents=True)
    torch.save(_as_mtt_buffer(tmp_path / "trained"), buffers / "replay_buffer_0.pt")
    r = dpd(
        "experts",
        "import",
        buffers,
        "--dataset",
        "fashion-mnist-mini",
        "--no-zca",
        "--out",
        tmp_path / "imported",
        "--lr",
        "0.01",
        *NET,
    )
    assert r.exit_code == 0, r.output
    assert "2 imported experts in" in r.stdout and "2 converted now" in r.stdout
    assert f"Next: dpd distill --experts {tmp_path / 'imported'}" in r.stdout
    return tmp_path / "imported"


def _evaluate(dpd, target: Path) -> list[float]:
    r = dpd("evaluate", target, *EVAL)
    assert r.exit_code == 0, r.output
    (entry,) = json.loads(r.stdout)["results"]
    return entry["accuracies"]


def test_import_distil_export_and_evaluate_the_reloaded_set(dpd, imported, tmp_path):
    # The imported trajectories are the trained ones, number for number.
    for name in ("expert_00000.safetensors", "expert_00001.safetensors"):
        a = storage.load_tensors(tmp_path / "trained" / name, "dpd.trajectory")[0]["trajectory"]
        b = storage.load_tensors(imported / name, "dpd.trajectory")[0]["trajectory"]
        assert torch.equal(a, b)
    r = dpd("distill", "--experts", imported, "--out", tmp_path / "run", *DISTILL, "--threads", "1")
    assert r.exit_code == 0, r.output
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())["settings"]
    assert (settings["width"], settings["depth"], settings["zca"], settings["train_per_class"]) == (8, 2, False, None)

    r = dpd("export", tmp_path / "run", "--format", "npz", "--out", tmp_path / "exported")
    assert r.exit_code == 0, r.output
    # Back from the archive with NumPy alone, into a synthetic set dpd evaluates.
    with np.load(tmp_path / "exported" / "synthetic.npz", allow_pickle=False) as z:
        arrays = {k: torch.from_numpy(z[k].copy()) for k in z.files if k not in ("classes", "meta_json")}
        meta = json.loads(str(z["meta_json"]))
    original, _ = load_synthetic(tmp_path / "run" / "synthetic.safetensors")
    assert set(arrays) == {"images", "labels", "lr", "norm_mean", "norm_std"}
    for k, v in arrays.items():
        assert torch.equal(v, original[k]), k
    back = tmp_path / "reloaded" / "synthetic.safetensors"
    storage.save_tensors(back, arrays, "dpd.synthetic", meta)
    accuracy = _evaluate(dpd, tmp_path / "run" / "synthetic.safetensors")
    assert _evaluate(dpd, back) == accuracy
    # The check can fail: the same set with its labels shifted by one class trains other networks.
    shifted = tmp_path / "shifted" / "synthetic.safetensors"
    storage.save_tensors(shifted, {**arrays, "labels": (arrays["labels"] + 1) % 10}, "dpd.synthetic", meta)
    assert _evaluate(dpd, shifted) != accuracy


def test_inspect_and_an_mtt_export_that_loads_back_as_the_run(dpd, imported, tmp_path):
    r = dpd("inspect", imported)
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert (
        "imported from 1 replay buffer file (mtt-replay-buffer); not recorded: momentum, weight decay, batch, dsa, seed, "
        "test accuracy"
    ) in text
    assert "lr 0.01" in text
    facts = json.loads(dpd("inspect", imported, "--json").stdout)
    assert facts["imported"]["files"] == [
        str((imported.parent / "buffers/FashionMNIST_NO_ZCA/ConvNet/replay_buffer_0.pt").resolve())
    ]
    assert dpd("distill", "--experts", imported, "--out", tmp_path / "run", *DISTILL, "--threads", "1").exit_code == 0
    r = dpd("export", tmp_path / "run", "--format", "mtt", "--out", tmp_path / "mtt")
    assert r.exit_code == 0, r.output
    assert "Exported 10 images (mtt) to" in r.stdout and "README.txt says how to load them" in r.stdout
    t, _ = load_synthetic(tmp_path / "run" / "synthetic.safetensors")
    load = lambda name: torch.load(tmp_path / "mtt" / name, map_location="cpu", weights_only=True)  # noqa: E731
    assert torch.equal(load("images_best.pt"), t["images"]) and torch.equal(load("labels_best.pt"), t["labels"])
    assert torch.equal(load("lr_best.pt"), t["lr"])
    r = dpd("export", tmp_path / "run", "--format", "mtt", "--out", tmp_path / "mtt")
    assert r.exit_code == 2 and "already exists. Add --force to replace it" in r.output and "Traceback" not in r.output
    assert dpd("export", tmp_path / "run", "--format", "datm", "--out", tmp_path / "mtt", "--force").exit_code == 0
    assert load("labels_best.pt").shape == (10, 10)


def test_import_bad_input_exits_2_with_a_message(dpd, tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    r = dpd(
        "experts",
        "import",
        tmp_path / "empty.pt",
        "--dataset",
        "fashion-mnist-mini",
        "--no-zca",
        "--out",
        tmp_path / "x",
        *NET,
    )
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"Error: {tmp_path / 'empty.pt'} is empty (0 bytes): not a replay buffer." in r.output
    assert not (tmp_path / "x").exists()
    r = dpd("experts", "import", tmp_path / "empty.pt", "--dataset", "fashion-mnist-mini", *NET)
    assert r.exit_code == 2 and "needs --zca or --no-zca" in r.output
    r = dpd("experts", "--num", "3", "import", tmp_path / "empty.pt")
    assert r.exit_code == 2
    assert (
        "--num is an option of `dpd experts` (training). Put the options of `dpd experts import` after `import`"
        in r.output
    )
    r = dpd("export", tmp_path, "--format", "npz")
    assert r.exit_code == 2 and "`dpd export` needs --out DIR" in r.output


def test_experts_without_subcommand_still_trains(dpd, tmp_path):
    r = dpd("experts", "--num", "1", "--epochs", "1", "--out", tmp_path / "ex", *TINY)
    assert r.exit_code == 0, r.output
    assert "1 expert in" in r.stdout and (tmp_path / "ex" / "expert_00000.safetensors").exists()


def test_ctrl_c_in_the_live_view_keeps_converted_experts_and_a_rerun_finishes(dpd, monkeypatch, tmp_path):
    import os
    import signal
    import threading
    import time

    from dpd_cli.cli.console import error_console
    from dpd_cli.recipes import experts_import
    from tests.helpers import mtt_buffer

    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TERM", "xterm")
    assert error_console().is_terminal  # the Rich live view, not plain lines
    torch.manual_seed(0)
    for n in range(2):
        torch.save(
            mtt_buffer([mtt_convnet(1, 10, 8, 2, (28, 28)) for _ in range(2)], 2, seed=n),
            tmp_path / f"replay_buffer_{n}.pt",
        )
    real, saved = experts_import.storage.save_tensors, []

    def save_then_sigint(path, *a, **k):
        real(path, *a, **k)
        saved.append(Path(path).name)
        if saved == ["preprocess.safetensors", "expert_00000.safetensors"]:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)

    monkeypatch.setattr(experts_import.storage, "save_tensors", save_then_sigint)
    args = [
        "experts",
        "import",
        tmp_path,
        "--dataset",
        "fashion-mnist-mini",
        "--no-zca",
        "--out",
        tmp_path / "imp",
        *NET,
    ]
    r = dpd(*args)
    assert r.exit_code == 130, r.output
    assert (
        f"Interrupted: stopped while importing {tmp_path / 'replay_buffer_0.pt'}; the experts converted so far are kept in "
        f"{tmp_path / 'imp'}. Rerun the same command to convert the rest"
    ) in " ".join(r.output.split())
    assert [p.name for p in (tmp_path / "imp").glob("expert_*")] == ["expert_00000.safetensors"]
    r = dpd(*args)
    assert r.exit_code == 0, r.output
    assert "4 imported experts" in r.stdout and "3 converted now, 1 already there" in r.stdout
    assert "1 of 2 experts converted" in r.output and "2 of 2 experts converted" in r.output  # a line per buffer file
    deadline = time.monotonic() + 2.0  # Rich's Live.stop() does not join its refresh thread
    while [t for t in threading.enumerate() if type(t).__name__ == "_RefreshThread"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not [t for t in threading.enumerate() if type(t).__name__ == "_RefreshThread"]


class _Payload:
    """Unpickling it would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_pickle_that_would_run_code_is_refused_without_running_it(dpd, tmp_path, how):
    import pickle

    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save([_Payload(marker)], evil)
    else:
        evil.write_bytes(pickle.dumps([[[_Payload(marker)]]]))
    r = dpd("experts", "import", evil, "--dataset", "fashion-mnist-mini", "--no-zca", "--out", tmp_path / "x", *NET)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert (
        f"Error: {evil} holds Python objects that would run code when loaded (posix.system); refused — dpd never "
        "unpickles."
    ) in " ".join(r.output.split())
    assert "weights_only" not in r.output and "truncated" not in r.output
    assert not marker.exists() and not (tmp_path / "x").exists()
