"""Every benchmark script imports, answers ``--help`` and runs its ``--smoke`` (and so does ``gpu_check.sh --smoke``).

The subprocesses run two at a time (the smoke runs are mostly interpreter and torch start-up).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))
NAMES = [p.stem for p in SCRIPTS]


def _run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OUT": str(tmp / "gpu-check"),
        "NO_COLOR": "1",
        "DPD_EXPERTS_ROOT": str(tmp / "experts-root"),
        "DPD_CACHE_ROOT": str(tmp / "cache-root"),
        "DPD_DATA_ROOT": str(tmp / "data-root"),
    }
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every command's result, keyed by (script, flag)."""
    jobs = {}
    for p in SCRIPTS:
        jobs[p.stem, "--help"] = [sys.executable, str(p), "--help"]
        out = tmp_path_factory.mktemp(p.stem)
        jobs[p.stem, "--smoke"] = [sys.executable, str(p), "--smoke"] + (
            [] if p.stem == "mtt_reference" else ["--out", str(out / "out.json" if p.stem == "speed" else out / "out")]
        )
    out = tmp_path_factory.mktemp("scale")  # the scale answer's pipeline at toy size (CPU, embedded set)
    jobs["dpd_study", "--plan scale --smoke"] = [sys.executable, str(ROOT / "benchmarks" / "dpd_study.py")]
    jobs["dpd_study", "--plan scale --smoke"] += ["--plan", "scale", "--smoke", "--out", str(out / "out")]
    for flag in ("--help", "--smoke"):
        jobs["gpu_check.sh", flag] = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), flag]
    # The longest first, so that the two lanes finish together.
    order = sorted(jobs, key=lambda k: (k[1] != "--smoke", k[0] not in ("gpu_check.sh", "speed")))
    with ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(_run, jobs[k], tmp_path_factory.mktemp("cwd")) for k in order}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("name", NAMES)
def test_the_script_imports_with_public_names_only(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)
    private = [
        f"{n.module}.{a.name}"
        for n in ast.walk(ast.parse((ROOT / "benchmarks" / f"{name}.py").read_text()))
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("dpd_cli")
        for a in n.names
        if "._" in f".{n.module}" or (a.name.startswith("_") and not a.name.endswith("__"))
    ]
    assert not private, f"{name} imports private names of dpd_cli: {private}"


@pytest.mark.parametrize("flag", ["--help", "--smoke"])
@pytest.mark.parametrize("name", NAMES + ["gpu_check.sh"])
def test_the_script_runs(runs, name, flag):
    r = runs[name, flag]
    assert r.returncode == 0, f"{name} {flag}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def test_the_scale_answer_runs_at_smoke_size(runs):
    r = runs["dpd_study", "--plan scale --smoke"]
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "| abs-largest-0.01 | 2 | 0 |" in r.stdout and "65.3 ± 0.7 %" in r.stdout


def test_the_study_report_reads_the_earlier_scripts_records_and_pairs_each_variant_with_mtt_at_its_lr(tmp_path):
    """``--report-only`` on ``<out>/records.jsonl`` as the earlier dpd_study.py wrote it (its run layout
    ``<out>/<dataset>/ipc<IPC>/<variant>/s<seed>`` is the one `dpd study` now writes per cell)."""

    def rec(variant, seed, acc, ckpts=(0.5, 0.4)):
        checkpoints = [{"iteration": 25 * i, "mean": m} for i, m in enumerate(ckpts)]
        return {"dataset": "d", "ipc": 10, "variant": variant, "seed": seed, "selected": acc, "final": acc} | {
            "selected_iteration": 25,
            "checkpoints": checkpoints,
            "distill_s": 1.0,
            "evaluate_s": 1.0,
        }

    records = [rec("mtt@lr10", s, 0.50) for s in range(3)] + [
        rec("abs-largest-0.01@lr10", s, 0.51 + 0.01 * s) for s in range(3)
    ]
    records += [rec("mtt@lr1", s, 0.60) for s in range(3)] + [rec("abs-largest-0.01@lr1", s, 0.58) for s in range(2)]
    diverged = {"dataset": "d", "ipc": 10, "variant": "abs-largest-0.01@lr1", "seed": 2, "diverged": "NaN"}
    records.append(diverged | {"distill_s": 1.0, "evaluate_s": 0.0})
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dpd_study.py"), "--report-only", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr
    rows = {row["variant"]: row for row in json.loads((tmp_path / "results.json").read_text())["summary"]}
    assert rows["abs-largest-0.01@lr10"]["selected"]["vs_baseline"]["mean"] == pytest.approx(2.0)
    assert rows["abs-largest-0.01@lr1"]["selected"]["vs_baseline"]["mean"] == pytest.approx(-2.0)
    assert rows["abs-largest-0.01@lr1"]["diverged_seeds"] == [2] and rows["abs-largest-0.01@lr1"]["n_seeds"] == 2
    assert (
        rows["mtt@lr1"]["worst_drop"] == [pytest.approx(10.0)] * 3 and "vs_baseline" not in rows["mtt@lr1"]["selected"]
    )
    assert "| abs-largest-0.01@lr1 | 2 | 1 |" in (tmp_path / "results.md").read_text()
