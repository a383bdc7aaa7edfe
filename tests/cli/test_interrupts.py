"""Interruptions: SIGKILL at any moment, Ctrl-C (once and twice), full or read-only disks, two writers.

Real signals go to real processes. Starting ``python -m dpd_cli`` costs seconds (importing
torch), so the signalled commands run in children forked from one "zygote" process that has
imported torch and dpd once (``ZYGOTE`` below): each child runs the same entry point as
``dpd`` with its own stdout/stderr files, and the test signals it by pid. A child can carry a
hook that makes a kill land at an exact point (inside the fsync of a given temp file, or in
a distillation step that sleeps), which polling alone cannot hit reliably.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpd_cli.artifacts import layout
from dpd_cli.artifacts.experts import ExpertSet
from dpd_cli.artifacts.synthetic import load as load_synthetic
from dpd_cli.cli.app import app
from dpd_cli.core import matching
from dpd_cli.io import storage
from dpd_cli.recipes import distill as distill_engine
from tests.cli.conftest import TINY

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="uses fork, POSIX signals and /proc/self/fd"
)

ITER = 14
#: Bit-identical resumes are promised on the same device; CPU makes them so on a GPU machine too.
CPU = ["--device", "cpu"]
DISTILL = [
    "--ipc",
    "2",
    "--batch-syn",
    "7",
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
    *CPU,
    "--quiet",
    *TINY,
]

ZYGOTE = r"""
import json, os, signal, sys, time, traceback
import torch  # the expensive imports, done once; children are forked from here (no torch op has run: no threads)
import torch._dynamo, torch.func, PIL.Image  # noqa: F401  (torch.optim imports torch._dynamo on first use: ~2 s)
from dpd_cli.cli.app import app
import dpd_cli.recipes.distill, dpd_cli.recipes.evaluate, dpd_cli.recipes.experts  # noqa: F401


def install(hook):
    if "kill_on_fsync" in hook:  # SIGKILL inside the fsync of the nth temp file named .<prefix>...tmp
        real, seen = os.fsync, [0]

        def fsync(fd):
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            if name.startswith("." + hook["kill_on_fsync"]) and name.endswith(".tmp"):
                seen[0] += 1
                if seen[0] == hook.get("nth", 1):
                    if hook.get("torn"):
                        os.ftruncate(fd, os.fstat(fd).st_size // 2)
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(fd)
        os.fsync = fsync
    if "slow_step" in hook:  # the nth distillation step announces itself, then takes a minute
        from dpd_cli.core import matching
        real_mg, calls = matching.meta_gradient, [0]

        def slow(*a, **k):
            calls[0] += 1
            if calls[0] == hook["slow_step"]:
                open(hook["marker"], "w").close()
                time.sleep(60)
            return real_mg(*a, **k)
        matching.meta_gradient = slow


print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            os.environ.update(job["env"])
            for fd, name in ((1, "out"), (2, "err")):
                os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            install(job.get("hook") or {})
            try:
                app(job["argv"], prog_name="dpd")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Child:
    """A dpd command running in a forked child; ``code`` is its exit code (-9: SIGKILL)."""

    def __init__(self, zygote: Zygote, pid: int, out: Path, err: Path):
        self.zygote, self.pid, self.out, self.err = zygote, pid, out, err
        self.code: int | None = None

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        if self.code is None:
            self.code = json.loads(self.zygote.readline(timeout))["code"]
        return self.code

    def running_after(self, seconds: float) -> bool:
        if self.zygote.poll_line(seconds):
            self.wait(1)
            return False
        return True

    @property
    def stderr(self) -> str:
        return self.err.read_text()


class Zygote:
    def __init__(self, cwd: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self._buf = b""
        self.ready = False

    def poll_line(self, timeout: float) -> bool:
        """Is a line available within ``timeout`` seconds?"""
        if b"\n" in self._buf:
            return True
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if r:
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            assert chunk, "the zygote died"
            self._buf += chunk
        return b"\n" in self._buf

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from the dpd child within the time limit")
            self.poll_line(left)
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def start(self, argv, tmp: Path, env: dict, hook: dict | None = None) -> Child:
        if not self.ready:
            assert self.readline(120) == "ready"
            self.ready = True
        n = len(list(tmp.glob("child-*.out")))
        out, err = tmp / f"child-{n}.out", tmp / f"child-{n}.err"
        job = {
            "argv": [str(a) for a in argv],
            "cwd": str(tmp),
            "env": env,
            "out": str(out),
            "err": str(err),
            "hook": hook,
        }
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        return Child(self, json.loads(self.readline(30))["pid"], out, err)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))  # imports torch while the module fixtures build experts
    yield z
    z.close()


@pytest.fixture(scope="module")
def experts(tmp_path_factory, zygote) -> Path:
    out = tmp_path_factory.mktemp("shared") / "ex"
    r = CliRunner().invoke(app, ["experts", "--num", "2", "--epochs", "3", "--out", str(out), "--quiet", *TINY])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def env(tmp_path) -> dict:
    """The isolated environment of tests/cli/conftest.py, for children."""
    return {
        k: os.environ[k] for k in ("NO_COLOR", "COLUMNS", "DPD_EXPERTS_ROOT", "DPD_DATA_ROOT", "DPD_CACHE_ROOT")
    } | {"DPD_DEBUG": ""}


def dpd(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def metric_lines(run: Path) -> int:
    try:
        return sum(1 for line in (run / "metrics.jsonl").read_text().splitlines() if line.endswith("}"))
    except FileNotFoundError:
        return 0


def wait_for(predicate, child: Child, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert child.code is None and not child.zygote.poll_line(0), f"the child ended early:\n{child.stderr}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def assert_only_complete_files(run: Path) -> None:
    """After a kill: every file under its real name loads fully; temp files never pass for valid."""
    for p in run.rglob("*.safetensors"):
        if p.name.startswith("."):
            continue
        if p.name == "prune_frequency.safetensors":
            storage.load_tensors(p, "dpd.prune_counts", {"counts": (torch.int32, 1)})
        elif p.name == "preprocess.safetensors":
            storage.load_tensors(p, "dpd.preprocess", {"norm_mean": (torch.float32, 1)})
        else:
            load_synthetic(p)
    json.loads((run / "settings.json").read_text())
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    for line in lines[:-1]:
        json.loads(line)  # only the last line may be torn


def same_result(a: Path, b: Path) -> None:
    ta, _ = load_synthetic(a / "synthetic.safetensors")
    tb, _ = load_synthetic(b / "synthetic.safetensors")
    assert (
        torch.equal(ta["images"], tb["images"])
        and torch.equal(ta["lr"], tb["lr"])
        and torch.equal(ta["labels"], tb["labels"])
    )
    pa, _ = storage.load_tensors(a / "prune_frequency.safetensors")
    pb, _ = storage.load_tensors(b / "prune_frequency.safetensors")
    assert torch.equal(pa["counts"], pb["counts"])
    strip = lambda run: [
        {k: v for k, v in json.loads(x).items() if k != "seconds"}
        for x in (run / "metrics.jsonl").read_text().splitlines()
    ]  # noqa: E731
    assert strip(a) == strip(b)


# ----------------------------------------------------------------------------------------------
# SIGKILL at several points, Ctrl-C once, then --resume: the same synthetic set as without them.


def test_kills_and_ctrl_c_then_resume_equal_an_uninterrupted_run(zygote, experts, tmp_path, env):
    args = ["distill", "--experts", experts, *DISTILL, "--iterations", ITER]
    full, part = tmp_path / "full", tmp_path / "part"
    r = dpd(*args, "--out", full)
    assert r.exit_code == 0, r.output

    # 1. SIGKILL from outside, mid-iteration, after 3 iterations (between checkpoints 2 and 4).
    child = zygote.start([*args, "--out", part], tmp_path, env)
    wait_for(lambda: metric_lines(part) >= 3, child)
    child.signal(signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL
    assert_only_complete_files(part)

    # 2. SIGKILL inside the write of checkpoint 6, its temp file torn in half: the temp stays, never a ckpt-000006.
    child = zygote.start(
        [*args, "--out", part, "--resume"], tmp_path, env, {"kill_on_fsync": "ckpt-000006.safetensors", "torn": True}
    )
    assert child.wait(60) == -signal.SIGKILL, child.stderr
    assert not (part / "checkpoints" / "ckpt-000006.safetensors").exists()
    (torn,) = (part / "checkpoints").glob(".ckpt-000006.safetensors.*.tmp")
    with pytest.raises(storage.StorageError, match="truncated"):
        load_synthetic(torn)  # the torn bytes never pass for a checkpoint
    assert_only_complete_files(part)

    # 3. SIGKILL after checkpoint 6 is in place, while synthetic.safetensors is written (complete temp, not renamed).
    child = zygote.start([*args, "--out", part, "--resume"], tmp_path, env, {"kill_on_fsync": "synthetic.safetensors"})
    assert child.wait(60) == -signal.SIGKILL, child.stderr
    assert not list((part / "checkpoints").glob(".ckpt-000006.safetensors.*.tmp"))  # the resume removed the stale temp
    assert (part / "checkpoints" / "ckpt-000006.safetensors").exists()
    assert load_synthetic(part / "synthetic.safetensors")[1]["iteration"] == 4  # the old, complete one
    assert list(part.glob(".synthetic.safetensors.*.tmp"))
    assert_only_complete_files(part)

    # 4. Ctrl-C once after 9 iterations: stops at the next safe point within seconds, saves, says how to resume.
    child = zygote.start([*args, "--out", part, "--resume"], tmp_path, env)
    wait_for(lambda: metric_lines(part) >= 9, child)
    t0 = time.monotonic()
    child.signal(signal.SIGINT)
    assert child.wait(30) == 130, child.stderr
    assert time.monotonic() - t0 < 3
    stopped = metric_lines(part)
    assert "Stopping at the next safe point" in child.stderr
    assert (
        f"Interrupted: stopped after iteration {stopped}; rerun the same command with --resume to continue {part}."
        in child.stderr
    )
    assert (part / "checkpoints" / f"ckpt-{stopped:06d}.safetensors").exists()
    assert load_synthetic(part / "synthetic.safetensors")[1]["iteration"] == stopped
    assert not list(part.rglob("*.tmp"))
    assert_only_complete_files(part)

    # 5. SIGKILL from outside once more, two iterations later.
    child = zygote.start([*args, "--out", part, "--resume"], tmp_path, env)
    wait_for(lambda: metric_lines(part) >= min(stopped + 2, ITER - 1), child)
    child.signal(signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL
    assert_only_complete_files(part)

    # Resume to the end: identical to the uninterrupted run, and no temp file left.
    r = dpd(*args, "--out", part, "--resume")
    assert r.exit_code == 0, r.output
    same_result(full, part)
    assert not list(part.rglob("*.tmp"))


@pytest.mark.parametrize("checkpoint_zero", [True, False], ids=["from-checkpoint-0", "no-checkpoint-at-all"])
def test_killed_before_the_first_checkpoint_resumes_from_zero(experts, tmp_path, monkeypatch, checkpoint_zero):
    args = ["distill", "--experts", experts, *DISTILL, "--iterations", 4]
    full, part = tmp_path / "full", tmp_path / "part"
    assert dpd(*args, "--out", full).exit_code == 0
    real, calls = matching.meta_gradient, []

    def dies_in_step_2(*a, **k):  # a process dying after iteration 1: settings.json, checkpoint 0 and one metric line
        calls.append(1)
        if len(calls) == 2:
            raise SystemExit(137)
        return real(*a, **k)

    monkeypatch.setattr(matching, "meta_gradient", dies_in_step_2)
    assert dpd(*args, "--out", part).exit_code == 137
    monkeypatch.setattr(matching, "meta_gradient", real)
    assert (part / "settings.json").exists() and metric_lines(part) == 1
    assert [p.name for p in layout.checkpoints(part)] == ["ckpt-000000.safetensors"]
    if not checkpoint_zero:  # as if it died while writing checkpoint 0: settings.json only
        shutil.rmtree(part / "checkpoints")
    (part / ".synthetic.safetensors.x1y2.tmp").write_bytes(b"partial")  # what a SIGKILL mid-write leaves
    r = dpd(*args, "--out", part, "--resume", "--quiet")
    assert r.exit_code == 0, r.output
    same_result(full, part)
    assert not list(part.rglob("*.tmp"))


# ----------------------------------------------------------------------------------------------
# Ctrl-C twice exits at once; a second process on the same run dir is refused while the first runs.


def test_second_ctrl_c_quits_at_once_and_a_second_writer_is_refused(zygote, experts, tmp_path, env):
    run = tmp_path / "run"
    args = ["distill", "--experts", experts, *DISTILL, "--iterations", 6, "--out", run]
    marker = tmp_path / "in-step-4"
    child = zygote.start(args, tmp_path, env, {"slow_step": 4, "marker": str(marker)})  # step 4 would take a minute
    wait_for(marker.exists, child)
    child.signal(signal.SIGINT)
    assert child.running_after(0.5)  # the first Ctrl-C waits for the end of the step

    # Meanwhile a second process writing the same run dir is refused, and changes nothing.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    r = dpd(*args)
    assert r.exit_code == 2
    assert (
        f"Error: Another dpd process is writing a distillation run in {run}. Wait for it to finish, or choose another --out."
        in r.output
    )
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before

    t0 = time.monotonic()
    child.signal(signal.SIGINT)
    assert child.wait(10) == 130, child.stderr
    assert time.monotonic() - t0 < 2
    assert (
        "Interrupted. Finished pieces are kept; rerun the same command (with --resume for distill) to continue."
        in child.stderr
    )
    assert "Traceback" not in child.stderr
    assert [p.name for p in layout.checkpoints(run)] == [
        "ckpt-000002.safetensors",
        "ckpt-000000.safetensors",
    ]  # nothing for the broken step
    assert not list(run.rglob("*.tmp"))
    r = dpd(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert metric_lines(run) == 6


def test_ctrl_c_during_experts_keeps_finished_experts(zygote, tmp_path, env):
    out = tmp_path / "ex"
    args = ["experts", "--num", "3", "--epochs", "3", "--out", out, *CPU, "--quiet", *TINY]
    child = zygote.start(args, tmp_path, env)
    wait_for((out / "expert_00001.safetensors").exists, child)
    t0 = time.monotonic()
    child.signal(signal.SIGINT)
    assert child.wait(30) == 130, child.stderr
    assert time.monotonic() - t0 < 3
    assert (
        f"Interrupted: stopped while training expert 2; kept 2 finished experts in {out}. Rerun the same command"
        in child.stderr
    )
    kept = {p: p.stat().st_mtime_ns for p in out.glob("expert_*.safetensors")}
    assert sorted(p.name for p in kept) == ["expert_00000.safetensors", "expert_00001.safetensors"]
    assert len(ExpertSet(out)) == 2 and not list(out.glob("*.tmp"))
    r = dpd(*args[: -len(TINY) - 1], *TINY)
    assert r.exit_code == 0, r.output
    assert "expert 0: already finished, skipped" in r.output and "expert 1: already finished, skipped" in r.output
    assert {p: p.stat().st_mtime_ns for p in kept} == kept and len(ExpertSet(out)) == 3


def test_ctrl_c_during_evaluate_keeps_finished_trainings(zygote, experts, tmp_path, env):
    run = tmp_path / "run"
    assert dpd("distill", "--experts", experts, *DISTILL, "--iterations", 2, "--out", run).exit_code == 0
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    args = ["evaluate", run, "--runs", "3", "--epochs", "60", "--threads", "1", "--concurrent", "1", *CPU, "--quiet"]
    partial = run / "eval.partial.jsonl"
    child = zygote.start(args, tmp_path, env)
    wait_for(lambda: partial.exists() and partial.read_text().count("\n") >= 1, child)
    child.signal(signal.SIGINT)
    assert child.wait(30) == 130, child.stderr
    done = partial.read_text().count("\n")
    assert 1 <= done < 3
    kept = "1 finished training is" if done == 1 else f"{done} finished trainings are"
    assert f"{kept} kept in {partial}. Rerun the same command to continue." in child.stderr
    assert not (run / "eval.json").exists()
    r = dpd(*args[:-1])
    assert r.exit_code == 0, r.output
    assert f"Reusing {done} finished training{'s' if done > 1 else ''} from {partial}." in r.output
    assert not partial.exists()
    assert dpd("evaluate", copy, *args[2:]).exit_code == 0  # uninterrupted
    a, b = (json.loads((d / "eval.json").read_text())["results"][0] for d in (run, copy))
    assert a["accuracies"] == b["accuracies"] and a["seeds"] == b["seeds"]


# ----------------------------------------------------------------------------------------------
# In-process Ctrl-C: the real handler (CliRunner runs in the main thread), Rich live views.


@pytest.fixture
def live_views(monkeypatch):
    """Make the progress views believe they draw on a terminal (Rich Live, refresh thread and all)."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TERM", "xterm")
    from dpd_cli.cli.console import error_console

    assert error_console().is_terminal


def _sigint_in_step(monkeypatch, step: int, times: int) -> None:
    real, calls = matching.meta_gradient, []

    def hooked(*a, **k):
        calls.append(1)
        if len(calls) == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # let the handler run
        return real(*a, **k)

    monkeypatch.setattr(matching, "meta_gradient", hooked)


def _no_live_left() -> None:
    # Rich's Live.stop() signals its refresh thread without joining it: give a stopped one a moment to end.
    deadline = time.monotonic() + 2.0
    while [t for t in threading.enumerate() if type(t).__name__ == "_RefreshThread"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not [t for t in threading.enumerate() if type(t).__name__ == "_RefreshThread"]
    assert type(sys.stdout).__name__ != "FileProxy" and type(sys.stderr).__name__ != "FileProxy"


@pytest.mark.parametrize("times", [1, 2], ids=["once", "twice"])
def test_ctrl_c_inside_rich_live_view(live_views, monkeypatch, experts, tmp_path, times):
    run = tmp_path / "run"
    _sigint_in_step(monkeypatch, 3, times)
    previous = signal.getsignal(signal.SIGINT)
    r = CliRunner().invoke(
        app,
        [
            "distill",
            "--experts",
            str(experts),
            *DISTILL[: -len(TINY) - 1],
            *TINY,
            "--iterations",
            "6",
            "--out",
            str(run),
        ],
    )
    assert r.exit_code == 130, r.output
    assert "Traceback" not in r.output and "Stopping at the next safe point (Ctrl-C again to quit at once)" in r.output
    if times == 1:
        assert (
            f"Interrupted: stopped after iteration 3; rerun the same command with --resume to continue {run}."
            in r.output
        )
        assert layout.checkpoints(run)[0].name == "ckpt-000003.safetensors"
    else:
        assert "Interrupted. Finished pieces are kept" in r.output
        assert layout.checkpoints(run)[0].name == "ckpt-000002.safetensors"
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is restored
    _no_live_left()
    assert not list(run.rglob("*.tmp"))


def test_first_ctrl_c_before_the_work_loop_quits_at_once(monkeypatch, experts, tmp_path):
    """Loading data has nothing to save: the first Ctrl-C does not wait for a safe point that is minutes away."""
    real = distill_engine.load_dataset

    def slow_load(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        return real(*a, **k)

    monkeypatch.setattr(distill_engine, "load_dataset", slow_load)
    t0 = time.monotonic()
    r = dpd("distill", "--experts", experts, *DISTILL, "--iterations", 4, "--out", tmp_path / "run")
    assert r.exit_code == 130, r.output
    assert time.monotonic() - t0 < 5
    assert "Interrupted. Finished pieces are kept" in r.output
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# Disk full, read-only output: a clear message, exit 2, nothing half-written.


def _enospc_on(monkeypatch, prefix: str) -> None:
    real = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("." + prefix):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)


def test_disk_full_during_distill_then_resume(experts, tmp_path):
    run = tmp_path / "run"
    args = ["distill", "--experts", experts, *DISTILL, "--iterations", 4, "--out", run]
    with pytest.MonkeyPatch.context() as mp:
        _enospc_on(mp, "ckpt-000002")
        r = dpd(*args)
    assert r.exit_code == 2
    assert (
        f"Error: No space left on the device while writing {run}/checkpoints/ckpt-000002.safetensors. "
        "Free some space and rerun (add --resume where it applies)." in r.output
    )
    assert "Traceback" not in r.output
    assert not list(run.rglob("*.tmp")) and not (run / "checkpoints" / "ckpt-000002.safetensors").exists()
    assert_only_complete_files(run)  # checkpoint 0 and the outputs written with it are whole
    assert load_synthetic(run / "synthetic.safetensors")[1]["iteration"] == 0
    r = dpd(*args, "--resume")  # space freed: --resume continues from checkpoint 0
    assert r.exit_code == 0, r.output
    assert metric_lines(run) == 4


def test_disk_full_while_appending_metrics_leaves_no_torn_line(experts, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = ["distill", "--experts", experts, *DISTILL, "--iterations", 4, "--out", run]
    calls = []
    real_write = os.write

    def half_then_full(fd, data):
        """The third append to metrics.jsonl gets half its bytes in, then the disk is full (as the kernel does it)."""
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            calls.append(1)
            if len(calls) == 3:
                return real_write(fd, bytes(data[: len(data) // 2]))
            if len(calls) > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(storage.os, "write", half_then_full)
    r = dpd(*args)
    assert r.exit_code == 2
    assert f"Error: No space left on the device while writing {run}/metrics.jsonl." in r.output
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("}\n") and text.count("\n") == 2  # cut back: no torn third line
    monkeypatch.setattr(storage.os, "write", real_write)
    r = dpd(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert metric_lines(run) == 4


def test_disk_full_during_experts_keeps_finished_ones(tmp_path):
    out = tmp_path / "ex"
    args = ["experts", "--num", "2", "--epochs", "2", "--out", out, "--quiet", *TINY]
    with pytest.MonkeyPatch.context() as mp:
        _enospc_on(mp, "expert_00001")
        r = dpd(*args)
    assert r.exit_code == 2
    assert f"No space left on the device while writing {out}/expert_00001.safetensors." in r.output
    assert [p.name for p in out.glob("expert_*")] == ["expert_00000.safetensors"] and not list(out.glob(".*.tmp"))
    assert dpd(*args).exit_code == 0 and len(ExpertSet(out)) == 2


def test_output_under_a_file_is_refused(experts, tmp_path):
    """/dev/null/x can never be a folder, whoever runs the test (chmod does not stop root)."""
    r = dpd("distill", "--experts", experts, *DISTILL, "--iterations", 2, "--out", "/dev/null/run")
    assert r.exit_code == 2
    assert "Error: Cannot write /dev/null/run/.lock: Not a directory. Check the output folder." in r.output


def test_read_only_output_folder(experts, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        # Root ignores chmod; simulate what the kernel would answer.
        real_open = storage.os.open

        def refuse(path, *a, **k):
            if str(path).startswith(str(ro)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, *a, **k)

        monkeypatch.setattr(storage.os, "open", refuse)
    else:
        ro.chmod(0o555)
    try:
        r = dpd("distill", "--experts", experts, *DISTILL, "--iterations", 2, "--out", ro)
    finally:
        ro.chmod(0o755)
    assert r.exit_code == 2
    assert (
        f"Error: Cannot write {ro}/.lock: Permission denied. Choose a writable output folder (--out) or fix its permissions."
        in r.output
    )
    assert list(ro.iterdir()) == []


def test_evaluate_of_a_read_only_run_says_how_to_evaluate_it(experts, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert dpd("distill", "--experts", experts, *DISTILL, "--iterations", 2, "--out", run).exit_code == 0
    if os.geteuid() == 0:  # root ignores chmod: the folder answers as a read-only one would
        from dpd_cli.recipes import evaluate as recipe

        real = os.access
        monkeypatch.setattr(recipe.os, "access", lambda p, mode: False if Path(p) == run else real(p, mode))
    run.chmod(0o555)
    try:
        r = dpd("evaluate", run, "--runs", "1", "--epochs", "1", "--threads", "1")
    finally:
        run.chmod(0o755)
    assert r.exit_code == 2 and "--out" not in r.output
    assert " ".join(r.output.split()) == (
        f"Error: Cannot write {run}/eval.json: {run} is read-only, and `dpd evaluate` writes its results next to the "
        f"run directory it evaluates. Copy the run directory to a writable folder and evaluate the copy (cp -r {run} "
        "COPY && dpd evaluate COPY), or make the folder writable. (Set DPD_DEBUG=1 to see the traceback.)"
    )


def test_read_only_file_system_mid_run(monkeypatch, experts, tmp_path):
    """EROFS while saving the synthetic set: the message says so; the checkpoint written before it is intact."""
    run = tmp_path / "run"
    real = storage.tempfile.mkstemp

    def mkstemp(*a, prefix="", **k):
        if prefix.startswith(".synthetic"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*a, prefix=prefix, **k)

    monkeypatch.setattr(storage.tempfile, "mkstemp", mkstemp)
    r = dpd("distill", "--experts", experts, *DISTILL, "--iterations", 4, "--out", run)
    assert r.exit_code == 2
    assert (
        f"Error: Cannot write {run}/synthetic.safetensors: Read-only file system. Choose a writable output folder (--out)"
        in r.output
    )
    load_synthetic(
        run / "checkpoints" / "ckpt-000000.safetensors"
    )  # the synthetic set is first written with checkpoint 0
    assert not (run / "synthetic.safetensors").exists() and not list(run.rglob("*.tmp"))


# ----------------------------------------------------------------------------------------------
# Two writers of the same output.


@pytest.mark.parametrize("command", ["distill", "experts", "evaluate"])
def test_second_writer_is_refused(command, experts, tmp_path):
    if command == "distill":
        folder, lock, what = tmp_path / "run", ".lock", "a distillation run"
        args = ["distill", "--experts", experts, *DISTILL, "--iterations", 2, "--out", folder]
    elif command == "experts":
        folder, lock, what = tmp_path / "ex", ".lock", "experts"
        args = ["experts", "--num", "1", "--epochs", "1", "--out", folder, *TINY]
    else:
        folder = tmp_path / "run"
        assert dpd("distill", "--experts", experts, *DISTILL, "--iterations", 2, "--out", folder).exit_code == 0
        lock, what = ".eval.json.lock", f"an evaluation of {folder / 'synthetic.safetensors'}"
        args = ["evaluate", folder, "--runs", "1", "--epochs", "1", "--threads", "1"]
    with storage.lock_dir(
        folder, "the test", lock
    ):  # flock: another open file description conflicts, even in this process
        r = dpd(*args)
    assert r.exit_code == 2
    assert f"Error: Another dpd process is writing {what} in {folder}." in r.output
    assert "Traceback" not in r.output
    assert dpd(*args).exit_code == 0  # once the lock is free


def test_a_signal_while_the_error_message_is_printed_does_not_swallow_it(monkeypatch, capsys):
    """torchrun sends SIGTERM to every rank once one has failed; it may land while the survivor is
    printing its own error. The message must still come out, with its exit code (not Typer's silent 130)."""
    import typer

    from dpd_cli.cli import console, errors
    from dpd_cli.errors import UserError

    real = console.error_console()

    class SignalledConsole:
        def print(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # delivered before the next bytecode of this thread
            real.print(*args, **kwargs)

    monkeypatch.setattr(console, "error_console", lambda: SignalledConsole())
    try:
        with pytest.raises(typer.Exit) as e, errors.handle_errors():
            raise UserError("Rank 0 of 2: summing a tensor over the ranks failed")
    except KeyboardInterrupt:
        pytest.fail("the signal cut the error message short")
    assert e.value.exit_code == 2
    assert "Rank 0 of 2: summing a tensor" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not errors._on_sigint  # handlers restored afterwards
