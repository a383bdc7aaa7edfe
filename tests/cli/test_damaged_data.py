"""Bytes flipped inside the tensor data (not the header) of a synthetic set, a checkpoint and an expert: every
command that reads the file stops with exit code 2 naming it, and `dpd inspect` / `dpd ls` flag it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.cli.test_pipeline import DISTILL


def flip_data_byte(path: Path) -> None:
    """Invert one byte in the middle of the file's tensor data; the header stays intact."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        size = path.stat().st_size
        pos = 8 + n + (size - 8 - n) // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


def assert_refused(r, path: Path) -> None:
    assert r.exit_code == 2, r.output
    assert path.name in r.output and "checksum" in r.output, r.output
    assert "Traceback" not in r.output, r.output


def _distill(dpd, experts, run, *extra):
    return dpd("distill", "--experts", experts, "--out", run, *DISTILL, *extra)


def _ls(dpd, root, *extra) -> dict:
    r = dpd("ls", root, "--json", *extra)
    assert r.exit_code == 0, r.output
    return {Path(e["path"]).name: e for e in json.loads(r.stdout)["entries"]}


def test_damaged_synthetic_set(dpd, experts, tmp_path):
    run = tmp_path / "runs" / "run"
    assert _distill(dpd, experts, run).exit_code == 0
    syn = run / "synthetic.safetensors"
    r = dpd("inspect", syn, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["checksum"] == "verified", r.output
    assert not _ls(dpd, tmp_path / "runs")["run"]["problems"]
    flip_data_byte(syn)

    for args in (("evaluate", run, "--epochs", "1", "--runs", "1", "--threads", "1"), ("evaluate", syn)):
        assert_refused(dpd(*args), syn)
    assert_refused(dpd("export", run, "--format", "npz", "--out", tmp_path / "exported"), syn)
    assert not (tmp_path / "exported").exists()

    r = dpd("inspect", syn, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert (data["valid"], data["checksum"]) == (False, "mismatch") and "checksum" in data["problems"][0]
    r = dpd("inspect", syn)
    assert "DAMAGED" in r.output and "INVALID" in r.output
    data = json.loads(dpd("inspect", run, "--json").stdout)
    entry = next(f for f in data["files"] if f["name"] == "synthetic.safetensors")
    assert entry["valid"] is False and "checksum" in entry["error"] and data["synthetic"] is None
    problems = _ls(dpd, tmp_path / "runs")["run"]["problems"]
    assert any("synthetic.safetensors" in p and "checksum" in p for p in problems), problems
    assert "! runs/run" in dpd("ls", tmp_path / "runs").output


def test_damaged_checkpoint(dpd, experts, tmp_path):
    run = tmp_path / "runs" / "run"
    assert _distill(dpd, experts, run).exit_code == 0
    ckpts = sorted((run / "checkpoints").glob("ckpt-*.safetensors"))
    newest = ckpts[-1]
    flip_data_byte(newest)
    damaged = newest.read_bytes()

    r = dpd("inspect", newest, "--json")
    assert json.loads(r.stdout)["checksum"] == "mismatch"
    data = json.loads(dpd("inspect", run, "--json").stdout)
    entry = next(f for f in data["files"] if f["name"] == f"checkpoints/{newest.name}")
    assert entry["valid"] is False and "checksum" in entry["error"]
    problems = _ls(dpd, tmp_path / "runs")["run"]["problems"]  # ls verifies the newest checkpoint
    assert any(newest.name in p for p in problems), problems
    assert_refused(dpd("evaluate", newest), newest)

    # A resume moves the damaged checkpoint aside, says so, and continues from the previous one.
    _resumes(
        dpd,
        experts,
        run,
        f"Warning: ckpt-000004.safetensors is damaged (checksum mismatch): moved aside to "
        f"ckpt-000004.safetensors.damaged; resuming {run} from ckpt-000002.safetensors (iteration 2), 2 iterations "
        "redone (3-4).",
    )
    assert (run / "checkpoints" / "ckpt-000004.safetensors.damaged").read_bytes() == damaged


def _resumes(dpd, experts, run, message: str) -> None:
    r = _distill(dpd, experts, run, "--resume")
    assert r.exit_code == 0, r.output
    assert message in " ".join(r.output.split()), r.output
    assert not _ls(dpd, run.parent)[run.name]["problems"]


def test_resume_moves_damaged_checkpoints_aside_and_says_what_it_redoes(dpd, experts, tmp_path):
    run = tmp_path / "runs" / "run"
    assert _distill(dpd, experts, run).exit_code == 0
    first = load_file(run / "synthetic.safetensors")
    folder = run / "checkpoints"
    newest = folder / "ckpt-000004.safetensors"
    cut = newest.read_bytes()[: newest.stat().st_size // 2]
    newest.write_bytes(cut)
    _resumes(
        dpd,
        experts,
        run,
        f"Warning: ckpt-000004.safetensors is damaged (truncated): moved aside to ckpt-000004.safetensors.damaged; "
        f"resuming {run} from ckpt-000002.safetensors (iteration 2), 2 iterations redone (3-4).",
    )
    assert (folder / "ckpt-000004.safetensors.damaged").read_bytes() == cut

    # A run killed after its metrics but before its checkpoint.
    newest.unlink()
    _resumes(
        dpd,
        experts,
        run,
        f"Resuming {run} from ckpt-000002.safetensors (iteration 2), 2 iterations redone (3-4): the run had got to "
        "iteration 4, past its newest checkpoint.",
    )

    # Every checkpoint damaged: each is kept aside, and the run starts again from iteration 0 to the same result.
    flip_data_byte(folder / "ckpt-000000.safetensors")
    flip_data_byte(folder / "ckpt-000002.safetensors")
    newest.write_bytes(cut)
    _resumes(
        dpd,
        experts,
        run,
        "Warning: ckpt-000004.safetensors is damaged (truncated): moved aside to ckpt-000004.safetensors.damaged.1; "
        "ckpt-000002.safetensors is damaged (checksum mismatch): moved aside to ckpt-000002.safetensors.damaged; "
        "ckpt-000000.safetensors is damaged (checksum mismatch): moved aside to ckpt-000000.safetensors.damaged; "
        f"{run} has no checkpoint left: starting again from iteration 0 with the same settings (every random choice "
        "is seeded, so the result is the same), 4 iterations redone (1-4).",
    )
    assert sorted(p.name for p in folder.glob("*.damaged*")) == [
        "ckpt-000000.safetensors.damaged",
        "ckpt-000002.safetensors.damaged",
        "ckpt-000004.safetensors.damaged",
        "ckpt-000004.safetensors.damaged.1",
    ]
    assert torch.equal(load_file(run / "synthetic.safetensors")["images"], first["images"])


def test_damaged_expert(dpd, experts, tmp_path):
    expert = experts / "expert_00001.safetensors"
    assert json.loads(dpd("inspect", expert, "--json").stdout)["checksum"] == "verified"
    flip_data_byte(expert)

    assert_refused(_distill(dpd, experts, tmp_path / "run"), expert)
    data = json.loads(dpd("inspect", experts, "--json").stdout)
    entry = next(e for e in data["experts"] if e["file"] == expert.name)
    assert entry["valid"] is False and "checksum" in entry["error"]
    assert any(expert.name in w for w in data["warnings"])
    assert json.loads(dpd("inspect", expert, "--json").stdout)["checksum"] == "mismatch"
    # `dpd ls` reads only the experts' headers; --verify reads every byte.
    assert not _ls(dpd, experts)["ex"]["problems"]
    problems = _ls(dpd, experts, "--verify")["ex"]["problems"]
    assert any(expert.name in p and "checksum" in p for p in problems), problems
