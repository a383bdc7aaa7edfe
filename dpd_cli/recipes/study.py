"""``dpd study CONFIG``: variants of ``dpd distill`` against a baseline over seeds, as paired differences.

The config holds a ``[study]`` table (``StudySettings``: seeds, variants, baseline) and the usual
``[experts]``, ``[distill]`` and ``[evaluate]`` settings. Every (variant, seed) run distils from the same
experts with ``--seed SEED``, so the runs of one seed share the initial images, every per-iteration draw
(expert, start epoch, mini-batches, DSA) and the evaluation networks' seeds: each variant minus the baseline
is a paired difference per seed. Each run is evaluated with ``--select val``; the test-max checkpoint
(optimistic) is read from the same trainings. The study folder::

    <out>/experts/            the shared experts ([study] experts may name another folder), trained from [experts]
    <out>/<variant>/s<seed>/  one run directory per (variant, seed)
    <out>/records.jsonl       one record per finished run: a rerun reuses them, and resumes the others
    <out>/study.json          the summary

Under torchrun every rank trains its share of the experts, then rank r takes runs r, r + W, ... (each run
one process), and rank 0 writes the summary once every rank is done.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dpd_cli import interrupt
from dpd_cli.artifacts import evaluation, layout, prune_counts
from dpd_cli.artifacts import synthetic as synthetic_file
from dpd_cli.config.settings import DistillSettings, EvalSettings, StudySettings, resolve, settings_hash, study_settings
from dpd_cli.core import parallel
from dpd_cli.errors import DivergedError, SettingsError, StorageError
from dpd_cli.events import Message, NullSink, Sink, StudyRunDone, StudyStarted
from dpd_cli.recipes import batch, distill, evaluate, experts
from dpd_cli.recipes.runtime import resolve_device
from dpd_cli.stats import paired

__all__ = ["Study", "load", "run", "run_batch", "read_records", "summarise", "pooled", "METRICS", "RECORDS"]

RECORDS, SUMMARY = "records.jsonl", "study.json"
#: What each run reports: the validation-selected checkpoint, the final set and the test-selected one (optimistic).
METRICS = ("selected", "final", "test_max")
#: ``--concurrent``'s default (on the CPU, on a GPU): 4 on the CPU, where the quick study distilled in 0.74-0.75
#: of K = 1's time (docs/results.md); 8 on a GPU, not measured yet.
CONCURRENT = (4, 8)
#: Settings that say where or how fast a run goes, not what it computes: left out of a record's key.
_PLACE = set("out experts resume force data_dir device threads log_every dist_timeout host_memory fail_under".split())


@dataclass(frozen=True)
class Study:
    """A config read: its ``[study]`` table, the study folder and the experts folder."""

    config: Path
    plan: StudySettings
    out: Path
    experts: Path

    @property
    def runs(self) -> list[tuple[str, int]]:
        """Every (variant, seed), seed by seed, so that the runs done first already pair up."""
        return [(v, s) for s in self.plan.seeds for v in self.plan.variants]

    def run_dir(self, variant: str, seed: int) -> Path:
        return self.out / variant / f"s{seed}"

    def distill_settings(self, variant: str, seed: int) -> DistillSettings:
        flags = {**self.plan.variants[variant], "seed": seed}
        flags |= {"out": str(self.run_dir(variant, seed)), "experts": str(self.experts)}
        s = resolve("distill", flags, self.config)
        if s.keep_checkpoints == "latest":  # --select val chooses among the kept checkpoints
            s = resolve("distill", {**flags, "keep_checkpoints": "all"}, self.config)
        return s

    def eval_settings(self, seed: int) -> EvalSettings:
        return resolve("evaluate", {"seed": seed, "select": "val", "baseline": []}, self.config)

    def key(self, variant: str, seed: int) -> str:
        """What a record must match to be reused: the run's distill and evaluate settings, but for paths and devices."""
        d, e = self.distill_settings(variant, seed), self.eval_settings(seed)
        return settings_hash(d, _PLACE) + settings_hash(e, _PLACE)


def load(config: Path, out: Path | None = None) -> Study:
    """Read and check a study config (``SettingsError`` naming every problem): its table and each run's settings."""
    config = Path(config)
    plan = study_settings(config)
    out = Path(out or plan.out or Path("runs") / f"study-{config.stem}")
    study = Study(config, plan, out, Path(plan.experts or out / "experts"))
    ex = resolve("experts", {"out": str(study.experts)}, config)
    if ex.val_per_class is None:
        raise SettingsError(
            f"Config file {config}: a study picks each run's checkpoint on a validation split; set val_per_class "
            "(e.g. 50) at the top of the file, so that the experts and every run hold the same images out."
        )
    for variant in plan.variants:
        try:
            study.distill_settings(variant, plan.seeds[0])
        except SettingsError as e:
            raise SettingsError(f"[study] variant {variant!r}: {e}") from None
    study.eval_settings(plan.seeds[0])
    return study


def read_records(out: Path) -> list[dict]:
    """The records of ``out/records.jsonl`` (the last of each (dataset, IPC, variant, seed)); torn lines are skipped."""
    path = Path(out) / RECORDS
    found = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(line)
            found[r["dataset"], r["ipc"], r["variant"], r["seed"]] = r
        except (ValueError, KeyError, TypeError):
            continue
    return list(found.values())


def _append(out: Path, record: dict) -> None:
    """One line per record: appends of a few kB from several ranks do not interleave."""
    with open(Path(out) / RECORDS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _distilled(d: DistillSettings) -> bool:
    try:
        return synthetic_file.load(Path(d.out) / layout.SYNTHETIC)[1]["iteration"] >= d.iterations
    except StorageError:
        return False


def _start(d: DistillSettings) -> DistillSettings:
    """``d`` resumed from its newest checkpoint, or started over where it has none."""
    resume = bool(layout.checkpoints(Path(d.out)))
    return d.model_copy(update={"resume": resume, "force": not resume})


def _batches(study: Study, runs: list[tuple[str, int]], k: int) -> list[list[tuple[str, int]]]:
    """``runs`` in batches of at most ``k`` that can run as one computation, in order (a seed's variants
    together): the same settings but for ``batch.PER_RUN``, and the same iteration to start from. A run whose
    synthetic set is finished (it is only evaluated) goes alone."""
    groups: dict = {}
    for v, s in runs:
        d = study.distill_settings(v, s)
        newest = layout.checkpoints(Path(d.out))[:1]
        at = layout.checkpoint_iteration(newest[0]) if newest else 0
        key = (v, s) if _distilled(d) else (json.dumps(batch.shared_settings(d), sort_keys=True), at)
        open_ = [g for g in groups.get(key, []) if len(g) < k]
        if open_:
            open_[0].append((v, s))
        else:
            groups.setdefault(key, []).append([(v, s)])
    return sorted((g for gs in groups.values() for g in gs), key=lambda g: runs.index(g[0]))


def run_batch(study: Study, runs: list[tuple[str, int]]) -> list[dict]:
    """Distil (or resume, or reuse) the (variant, seed) ``runs`` as one computation, then evaluate each;
    returns their records (``diverged`` for a run that did: the others go on; ``distill_s``: a run's share of
    the batch's time)."""
    todo = [r for r in runs if not _distilled(study.distill_settings(*r))]
    t0, ended = time.perf_counter(), {}
    if len(todo) == 1:
        try:
            distill.run(_start(study.distill_settings(*todo[0])))
        except DivergedError as err:  # the run stopped: recorded as diverged, with no accuracy
            ended[todo[0]] = err
    elif todo:
        with batch.BatchRecipe([_start(study.distill_settings(*r)) for r in todo], None, distill.DistillRecipe) as b:
            ended = {r: o for r, o in zip(todo, b.train(keep_going=True), strict=True) if isinstance(o, DivergedError)}
    distill_s = (time.perf_counter() - t0) / max(len(todo), 1)  # each run's share of the batch
    return [_record(study, v, s, distill_s, ended.get((v, s))) for v, s in runs]


def _record(study: Study, variant: str, seed: int, distill_s: float, err: DivergedError | None) -> dict:
    """The record of a distilled (variant, seed): evaluated (or its evaluation reused), or diverged (``err``)."""
    d, ev = study.distill_settings(variant, seed), study.eval_settings(seed)
    run_dir = Path(d.out)
    key = {"dataset": d.dataset, "ipc": d.ipc, "variant": variant, "seed": seed, "key": study.key(variant, seed)}
    if err is not None:  # the run stopped: recorded as diverged, with no accuracy
        return {**key, "diverged": str(err), "distill_s": distill_s, "evaluate_s": 0.0}
    t1 = time.perf_counter()
    want = ev.model_dump(mode="json")
    entries = [
        e
        for e in evaluation.load(evaluation.path_for(run_dir))["results"]
        if e["source"] == "distilled" and e.get("select") == "val" and e.get("settings") == want
    ] or evaluate.run(ev, run_dir)["results"]
    e = entries[-1]
    best = max(e.get("checkpoints") or [], key=lambda c: (c["mean"], c["iteration"]), default=None)
    counts, meta = prune_counts.load(run_dir / layout.PRUNE)
    layers = prune_counts.layer_stats(counts, meta["layout"], int(meta.get("iterations_pruned") or 0))["layers"]
    return {
        **key,
        "selected": e["mean"],
        "final": e["final_accuracy"],
        "test_max": best["mean"] if best else e["mean"],
        "selected_iteration": e["selected_iteration"],
        "test_max_iteration": best["iteration"] if best else e["selected_iteration"],
        "val_accuracy": e["val_accuracy"],
        "checkpoints": e.get("checkpoints"),
        "accuracies": e["accuracies"],
        "distill_s": distill_s,
        "evaluate_s": time.perf_counter() - t1,
        "prune_layers": {r["name"]: r["mean_pct"] for r in layers},
    }


def run(
    config: Path,
    out: Path | None = None,
    report_only: bool = False,
    sink: Sink | None = None,
    concurrent: int | None = None,
) -> dict:
    """Run every (variant, seed) of the study in ``config`` that has no record yet (none with ``report_only``),
    at most ``concurrent`` at once (default: ``[study] concurrent``, else ``CONCURRENT`` for the device), then
    summarise the records.

    Returns:
        ``{"config", "out", "baseline", "variants", "seeds", "missing", "summary", "records"}``; on the other
        ranks of a torchrun job ``summary`` is None (rank 0 reports).
    """
    sink = sink or NullSink()
    study = load(config, out)
    keys = {r: study.key(*r) for r in study.runs}

    def valid(rec: dict) -> bool:  # a record without a key (written by an earlier benchmark script) counts
        k = keys.get((rec["variant"], rec["seed"]))
        return k is not None and rec.get("key", k) == k

    done = {(r["variant"], r["seed"]) for r in read_records(study.out) if valid(r)}
    todo = [r for r in study.runs if r not in done]
    rank, world = parallel.world_from_env()
    if todo and not report_only:
        study.out.mkdir(parents=True, exist_ok=True)
        ex = resolve("experts", {"out": str(study.experts)}, study.config)
        with parallel.held(torch.device("cpu"), ex.dist_timeout) as group:
            sink.emit(StudyStarted(str(study.out), len(study.runs), len(todo), world))
            sink.emit(Message(f"experts: {ex.num} × {ex.epochs} epochs in {study.experts} (finished ones are reused)"))
            experts.run(ex)
            if group is not None:
                group.gather_objects(None)  # every rank's experts are written
            device = resolve_device(study.distill_settings(*todo[0]).device)
            k = concurrent or study.plan.concurrent or CONCURRENT[device.type == "cuda"]
            for runs in _batches(study, todo[rank::world], k):
                try:
                    with parallel.alone():
                        recs = run_batch(study, runs)
                except interrupt.Interrupted:
                    names = ", ".join(f"{v} s{s}" for v, s in runs)
                    these = (
                        ("run", "this one resumes from its") if len(runs) == 1 else ("runs", "these resume from their")
                    )
                    raise interrupt.Interrupted(
                        f"stopped in {these[0]} {names}; rerun `dpd study {config}` to continue (finished runs are "
                        f"reused, {these[1]} last checkpoint)"
                    ) from None
                for rec in recs:
                    _append(study.out, rec)
                    sink.emit(StudyRunDone(rec))
            if group is not None:
                group.gather_objects(None)  # every rank's runs are recorded
    records = [r for r in read_records(study.out) if valid(r)]
    result = {
        "config": str(config),
        "out": str(study.out),
        "baseline": study.plan.baseline,
        "variants": study.plan.variants,
        "seeds": study.plan.seeds,
        "missing": [f"{v} s{s}" for v, s in study.runs if (v, s) not in {(r["variant"], r["seed"]) for r in records}],
        "summary": None,
        "records": records,
    }
    if rank != 0:
        return result
    result["summary"] = summarise(records, study.plan.baseline, list(study.plan.variants))
    if study.out.is_dir():
        (study.out / SUMMARY).write_text(json.dumps(result, indent=2))
    return result


# --- the summary ---------------------------------------------------------------------------------
def _value(r: dict, metric: str) -> float | None:
    """A record's accuracy; test-max from its checkpoints for records written before it was recorded."""
    if metric == "test_max" and "test_max" not in r:
        return max((c["mean"] for c in r.get("checkpoints") or []), default=None)
    return r.get(metric)


def worst_drop(r: dict) -> float | None:
    """Points the worst kept checkpoint falls below checkpoint 0 (the real images it started from)."""
    means = {c["iteration"]: 100 * c["mean"] for c in r.get("checkpoints") or []}
    return means[0] - min(means.values()) if 0 in means else None


def _baseline_of(baseline: str | Callable[[str], str]) -> Callable[[str], str]:
    return baseline if callable(baseline) else (lambda _: baseline)


def summarise(records: list[dict], baseline: str | Callable[[str], str], order: list[str] = ()) -> list[dict]:
    """Per (dataset, IPC, variant): accuracy % over seeds (mean, sample std) per metric (``METRICS``), and
    the paired difference to the baseline variant (``baseline``: a name, or variant -> name) over the seeds
    both finished (``vs_baseline``: ``stats.paired``). Diverged runs are counted, not averaged."""
    base = _baseline_of(baseline)
    rank = {v: i for i, v in enumerate(order)}
    rows = []
    for dataset, ipc in sorted({(r["dataset"], r["ipc"]) for r in records}):
        cell = [r for r in records if (r["dataset"], r["ipc"]) == (dataset, ipc)]
        for variant in sorted({r["variant"] for r in cell}, key=lambda v: (rank.get(v, len(rank)), v)):
            runs = {r["seed"]: r for r in cell if r["variant"] == variant}
            mine = {s: r for s, r in runs.items() if "diverged" not in r}
            ref = {r["seed"]: r for r in cell if r["variant"] == base(variant) and "diverged" not in r}
            starts = [100 * c["mean"] for r in mine.values() for c in r.get("checkpoints") or [] if c["iteration"] == 0]
            row = {
                "dataset": dataset,
                "ipc": ipc,
                "variant": variant,
                "baseline": base(variant),
                "n_seeds": len(mine),
                "diverged_seeds": sorted(s for s, r in runs.items() if "diverged" in r),
                "worst_drop": [worst_drop(mine[s]) for s in sorted(mine)],
                "selected_iterations": [mine[s].get("selected_iteration") for s in sorted(mine)],
                # checkpoint 0: the class-balanced real images the runs of a seed start from
                "start": statistics.fmean(starts) if starts else None,
            }
            for metric in METRICS:
                vals = {s: 100 * v for s, r in mine.items() if (v := _value(r, metric)) is not None}
                if not vals:
                    continue
                sd = statistics.stdev(vals.values()) if len(vals) > 1 else 0.0
                row[metric] = {"mean": statistics.fmean(vals.values()), "std": sd}
                pairs = [(vals[s], 100 * _value(ref[s], metric)) for s in sorted(vals) if s in ref]
                if variant != base(variant) and pairs:
                    row[metric]["vs_baseline"] = paired([a - b for a, b in pairs])
            rows.append(row)
    return rows


def pooled(records: list[dict], baseline: str | Callable[[str], str], metric: str = "selected") -> list[dict]:
    """Each variant minus its baseline over every (dataset, IPC, seed) where both finished: one paired test of
    "does it help in general", with more pairs than one cell has."""
    base = _baseline_of(baseline)
    ok = [r for r in records if "diverged" not in r]
    ref = {(r["dataset"], r["ipc"], r["variant"], r["seed"]): r for r in ok}
    out = []
    for variant in dict.fromkeys(r["variant"] for r in ok if r["variant"] != base(r["variant"])):
        mine = [r for r in ok if r["variant"] == variant]
        keys = [(r, (r["dataset"], r["ipc"], base(variant), r["seed"])) for r in mine]
        diffs = [100 * (_value(r, metric) - _value(ref[k], metric)) for r, k in keys if k in ref]
        if len(diffs) >= 2:
            cells = [f"{d} IPC {i}" for d, i in sorted({(r["dataset"], r["ipc"]) for r in mine})]
            out.append({"variant": variant, "metric": metric, "cells": cells, "vs_baseline": paired(diffs)})
    return out
