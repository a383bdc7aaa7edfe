"""A run that another process is distilling: shown as running, and not read as if it were finished.

A real second process holds the run's lock with ``RunWriter.lock`` (what ``dpd distill`` takes) while the
commands run here; each refusal's proposed command is run too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.cli.conftest import DISTILL_TINY, TINY, user_error

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock semantics of Linux")

HOLD = textwrap.dedent("""
    import contextlib, sys
    from pathlib import Path
    from dpd_cli.artifacts.run_writer import RunWriter
    with contextlib.ExitStack() as stack:
        RunWriter(Path(sys.argv[1]), None).lock(stack)
        print("locked", flush=True)
        sys.stdin.read()  # until the test closes stdin
""")


def test_a_run_being_distilled_is_running_and_only_its_checkpoints_are_read(dpd, experts, tmp_path):
    run = tmp_path / "run"
    r = dpd("distill", "--experts", experts, "--out", run, *DISTILL_TINY, *TINY)
    assert r.exit_code == 0, r.output
    ckpt = run / "checkpoints" / "ckpt-000004.safetensors"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        who = f"dpd distill (pid {holder.pid})"
        assert (run / ".lock").read_text() == f"{holder.pid} dpd distill\n"

        r = dpd("ls", tmp_path, "--json")
        assert [e["state"] for e in json.loads(r.stdout)["entries"] if e["kind"] == "run"] == ["running"]
        r = dpd("inspect", run)
        assert r.exit_code == 0, r.output
        assert f"running (4/4 iterations so far; {who} holds the run's lock)" in " ".join(r.output.split())

        being = f"{run} is being distilled right now by {who}: its synthetic.safetensors changes at every checkpoint"
        newest = "Its newest complete checkpoint is iteration 4. Wait for the run to finish, or"
        for target in (run, run / "synthetic.safetensors"):
            r = dpd("evaluate", target, "--runs", "1", "--epochs", "1")
            user_error(r, being, newest, f"evaluate that checkpoint by naming it: `dpd evaluate {ckpt}`.")
        assert not (run / "eval.json").exists()
        r = dpd("export", run, "--format", "npz", "--out", tmp_path / "exp")
        user_error(
            r, being, f"export that checkpoint by naming it: `dpd export {ckpt}` with the same --format and --out."
        )
        assert not (tmp_path / "exp").exists()
        r = dpd("compare", run)
        user_error(r, being, f"evaluate that checkpoint (`dpd evaluate {ckpt}`) and compare it: `dpd compare {ckpt}`.")

        # What the refusals propose works while the run is still held.
        r = dpd("evaluate", ckpt, "--runs", "1", "--epochs", "1")
        assert r.exit_code == 0, r.output
        r = dpd("export", ckpt, "--format", "npz", "--out", tmp_path / "exp")
        assert r.exit_code == 0, r.output
        r = dpd("compare", ckpt)
        assert r.exit_code == 0, r.output
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0

    r = dpd("ls", tmp_path, "--json")
    assert [e["state"] for e in json.loads(r.stdout)["entries"] if e["kind"] == "run"] == ["finished"]
    r = dpd("export", run, "--format", "npz", "--out", tmp_path / "exp2")
    assert r.exit_code == 0, r.output
