"""``dpd study``: paired differences as computed independently from each run's eval.json, resume, --json, errors."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from dpd_cli.artifacts.synthetic import load as load_synthetic
from dpd_cli.recipes import study

TINY_STUDY = """
dataset = "fashion-mnist-mini"
width = 8
depth = 2
train_per_class = 20
val_per_class = 5
threads = 1

[study]
seeds = [0, 1]
baseline = "mtt"
variants = {{ mtt = {{ prune_ratio = 0 }}, dpd = {{ prune_ratio = 0.05 }} }}
out = "st"
{extra}
[experts]
num = 2
epochs = 3

[distill]
ipc = 1
iterations = 4
syn_steps = 3
max_start_epoch = 2
expert_epochs = 1
lr_img = 10
lr_lr = 1e-8
checkpoint_every = 2

[evaluate]
epochs = 2
runs = 2
"""
T_975_1 = 12.706204736174698  # Student's t, 97.5 % quantile, 1 degree of freedom


def _config(tmp_path, extra: str = "", **replace) -> str:
    text = TINY_STUDY.format(extra=extra)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "study.toml"
    path.write_text(text)
    return str(path)


def _accuracies(run_dir) -> tuple[float, float, float]:
    """(val-selected, final, test-max) % of a run, from its eval.json alone."""
    entry = [e for e in json.loads((run_dir / "eval.json").read_text())["results"] if e["source"] == "distilled"][-1]
    assert entry["select"] == "val"
    best = max(c["mean"] for c in entry["checkpoints"])
    return 100 * entry["mean"], 100 * entry["final_accuracy"], 100 * best


def test_study_pairs_each_seed_reuses_finished_runs_and_prints_json(dpd, tmp_path):
    cfg = _config(tmp_path)
    r = dpd("study", cfg, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["command"] == "study" and result["missing"] == []
    rows = {row["variant"]: row for row in result["summary"]}
    assert rows["mtt"]["n_seeds"] == rows["dpd"]["n_seeds"] == 2 and "vs_baseline" not in rows["mtt"]["selected"]
    accs = {(v, s): _accuracies(tmp_path / "st" / v / f"s{s}") for v in ("mtt", "dpd") for s in (0, 1)}
    for i, metric in enumerate(("selected", "final", "test_max")):
        diffs = [accs["dpd", s][i] - accs["mtt", s][i] for s in (0, 1)]
        mean, half = statistics.fmean(diffs), T_975_1 * statistics.stdev(diffs) / math.sqrt(2)
        got = rows["dpd"][metric]["vs_baseline"]
        assert got["mean"] == pytest.approx(mean) and got["n"] == 2
        assert got["ci"] == pytest.approx([mean - half, mean + half])
        assert rows["dpd"][metric]["mean"] == pytest.approx(statistics.fmean(accs["dpd", s][i] for s in (0, 1)))
    # Every run of a seed starts from the same images: checkpoint 0 trains alike in both variants.
    for s in (0, 1):
        zero = {
            v: next(c for c in rec["checkpoints"] if c["iteration"] == 0)
            for v in ("mtt", "dpd")
            for rec in result["records"]
            if rec["variant"] == v and rec["seed"] == s
        }
        assert zero["mtt"]["accuracies"] == zero["dpd"]["accuracies"]

    # A rerun reuses every finished run; one whose record and folder are gone is run again.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "st").glob("*/s*/synthetic.safetensors")}
    lines = (tmp_path / "st" / "records.jsonl").read_text().splitlines()
    (tmp_path / "st" / "records.jsonl").write_text(
        "\n".join(x for x in lines if '"variant": "dpd", "seed": 1' not in x) + "\n"
    )
    gone = tmp_path / "st" / "dpd" / "s1"
    for p in sorted(gone.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    r = dpd("study", cfg)
    assert r.exit_code == 0, r.output
    assert "1 of 4 runs to do" in r.output and "dpd s1: val-selected" in r.output
    assert "Δ vs mtt" in r.output and "test-max" in r.output
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if gone not in p.parents)
    again = json.loads(dpd("study", cfg, "--report-only", "--json").stdout)
    assert again["summary"] == json.loads((tmp_path / "st" / "study.json").read_text())["summary"]
    rerun = {x["variant"]: x for x in again["summary"]}["dpd"]
    assert rerun["selected"]["mean"] == pytest.approx(rows["dpd"]["selected"]["mean"])  # the same run again


@pytest.mark.parametrize(
    "extra, replace, message",
    [
        ("", {"[study]": "[stud]"}, "has no [study] table"),
        ("", {'baseline = "mtt"': 'baseline = "pad"'}, "baseline 'pad' is not a variant"),
        ("", {"dpd = {": "dpd = { seed = 3, "}, "variant 'dpd' sets seed"),
        ("", {"dpd = {": "dpd = { prune_ration = 1, "}, "variant 'dpd'"),
        ("", {"val_per_class = 5": ""}, "set val_per_class"),
        ("", {"seeds = [0, 1]": "seeds = []"}, "seeds"),
    ],
)
def test_study_config_errors_are_one_paragraph(dpd, tmp_path, extra, replace, message):
    r = dpd("study", _config(tmp_path, extra, **replace))
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_summary_pairs_with_each_variants_baseline_and_counts_diverged_runs():
    def rec(variant, seed, acc, ckpts=(0.5, 0.4)):
        checkpoints = [{"iteration": 25 * i, "mean": m} for i, m in enumerate(ckpts)]
        return {
            "dataset": "d",
            "ipc": 10,
            "variant": variant,
            "seed": seed,
            "selected": acc,
            "final": acc,
            "selected_iteration": 25,
            "checkpoints": checkpoints,
        }

    records = [rec("mtt@lr10", s, 0.50) for s in range(3)] + [rec("dpd@lr10", s, 0.51 + 0.01 * s) for s in range(3)]
    records += [rec("mtt@lr1", s, 0.60) for s in range(3)] + [rec("dpd@lr1", s, 0.58) for s in range(2)]
    records.append({"dataset": "d", "ipc": 10, "variant": "dpd@lr1", "seed": 2, "diverged": "NaN"})
    base = lambda v: "mtt" + v[v.index("@") :]
    rows = {r["variant"]: r for r in study.summarise(records, base)}
    assert rows["dpd@lr10"]["selected"]["vs_baseline"]["mean"] == pytest.approx(2.0)
    assert rows["dpd@lr1"]["selected"]["vs_baseline"]["mean"] == pytest.approx(-2.0)
    assert rows["dpd@lr1"]["diverged_seeds"] == [2] and rows["dpd@lr1"]["n_seeds"] == 2
    assert rows["mtt@lr1"]["worst_drop"] == [pytest.approx(10.0)] * 3 and rows["mtt@lr1"]["start"] == pytest.approx(50)
    assert rows["mtt@lr1"]["test_max"]["mean"] == pytest.approx(50.0)  # from the checkpoints of older records
    assert "vs_baseline" not in rows["mtt@lr1"]["selected"]
    pools = {p["variant"]: p for p in study.pooled(records, base)}
    assert pools["dpd@lr10"]["vs_baseline"]["n"] == 3 and pools["dpd@lr1"]["vs_baseline"]["n"] == 2


def test_study_under_torchrun_spreads_the_runs_over_the_ranks(tmp_path):
    from tests.cli.test_torchrun import torchrun

    p = torchrun(["study", _config(tmp_path)], tmp_path)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert "4 of 4 runs to do, spread over 2 processes" in out and out.count("Saved to") == 1
    records = study.read_records(tmp_path / "st")
    assert sorted((r["variant"], r["seed"]) for r in records) == [("dpd", 0), ("dpd", 1), ("mtt", 0), ("mtt", 1)]
    summary = {r["variant"]: r for r in json.loads((tmp_path / "st" / "study.json").read_text())["summary"]}
    assert summary["dpd"]["selected"]["vs_baseline"]["n"] == 2


def test_runs_batched_with_concurrent_2_record_what_they_record_one_at_a_time(dpd, tmp_path, monkeypatch):
    """Variants of a seed go in one batch (the diverging one drops out of its batch, the other finishes); every
    record and synthetic set as one at a time, up to float32 rounding."""
    from dpd_cli.recipes import batch

    sizes, init = [], batch.BatchRecipe.__init__
    monkeypatch.setattr(
        batch.BatchRecipe, "__init__", lambda self, runs, *a: sizes.append(len(runs)) or init(self, runs, *a)
    )
    variants = "mtt = { prune_ratio = 0 }, dpd = { prune_ratio = 0.05 }, wild = { prune_ratio = 0.05, lr_img = inf }"
    cfg = _config(tmp_path, 'experts = "ex"', **{"mtt = { prune_ratio = 0 }, dpd = { prune_ratio = 0.05 }": variants})
    records = {}
    for k in (1, 2):
        r = dpd("study", cfg, "--out", f"k{k}", "--concurrent", k, "--json")
        assert r.exit_code == 0, r.output
        records[k] = {(x["variant"], x["seed"]): x for x in json.loads(r.stdout)["records"]}
    assert sizes == [2, 2, 2]  # (mtt, dpd) s0, (wild s0, mtt s1), (dpd, wild) s1
    assert records[1].keys() == records[2].keys() and len(records[1]) == 6
    for run, one in records[1].items():
        two = records[2][run]
        assert ("diverged" in one) == ("diverged" in two) == (run[0] == "wild"), run
        if "diverged" in one:
            assert one["diverged"] == two["diverged"]
            continue
        for metric in ("selected", "final", "test_max"):
            assert two[metric] == pytest.approx(one[metric], abs=0.05), (run, metric)
        a, b = (load_synthetic(tmp_path / f"k{k}" / run[0] / f"s{run[1]}" / "synthetic.safetensors")[0] for k in (1, 2))
        assert float((b["images"] - a["images"]).norm() / a["images"].norm()) < 1e-4, run  # float32 rounding
