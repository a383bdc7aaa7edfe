"""``dpd evaluate``: train fresh networks on a synthetic set and test them on the real test set.

The test images go through the synthetic set's own normalisation and ZCA (stored in the file). Each
reported accuracy is the final network's (never the best over test evaluations). Baselines train the same
way: ``random`` on a seeded, class-balanced subset of the real training set with the same images per
class, ``init`` on the run's initial images, ``full`` on all real training data for ``full_epochs``.

Under torchrun the (source, model, run) trainings are sharded across ranks and gathered on rank 0, which
writes ``eval.json``. Each finished training is appended to ``eval.partial.jsonl`` beside it, keyed by the
synthetic set's content, the settings that change its result and ``PROTOCOL_VERSION``: an interrupted
evaluation rerun with the same command reuses them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dpd_cli import interrupt, stats
from dpd_cli.artifacts import evaluation, layout
from dpd_cli.artifacts import experts as experts_file
from dpd_cli.artifacts import synthetic as synthetic_file
from dpd_cli.artifacts.evaluation import load as load_eval
from dpd_cli.artifacts.evaluation import path_for as eval_path
from dpd_cli.artifacts.run import refuse_running
from dpd_cli.config.settings import EvalSettings
from dpd_cli.core import parallel
from dpd_cli.core.train import accuracy, fresh, sgd, train_epoch
from dpd_cli.data import Preprocess, load_dataset
from dpd_cli.data.datasets import class_balanced
from dpd_cli.errors import DataError, SettingsError, StorageError
from dpd_cli.events import EvalDone, EvalEpoch, EvalRunDone, EvalStarted, Message, NullSink, Sink
from dpd_cli.io import storage
from dpd_cli.io.provenance import versions
from dpd_cli.models import ModelSpec
from dpd_cli.recipes.runtime import derive_seed, prepare_runtime
from dpd_cli.text import plural

__all__ = [
    "run",
    "previous",
    "verdict",
    "PROTOCOLS",
    "PROTOCOL_VERSION",
    "epochs_run",
    "random_subset",
    "load_eval",
]

#: Protocol defaults: E (``--epochs``; E + 1 epochs run, see ``_train``) and lr (None = the learned alpha).
#: Both protocols run the same loop, MTT's ``evaluate_synset``; they differ only in these two values.
PROTOCOLS = {"mtt": {"epochs": 1000, "lr": None}, "fixed": {"epochs": 300, "lr": 0.01}}
#: The training loop's version, part of every job key and eval.json entry. Version 1 (dpd 0.1.0)
#: trained E epochs with ``MultiStepLR`` at E // 2 and kept the momentum; version 2 is MTT's loop.
PROTOCOL_VERSION = 2
_BASELINE_LR = 0.01
#: ``--concurrent``'s default (on the CPU, on a GPU): on the CPU a batch pays nothing (docs/results.md).
CONCURRENT = (1, 8)
_WAIT = "Wait for it to finish."
_TARGET_HINT = "Give a run directory (from `dpd distill`) or a synthetic.safetensors file."


def verdict(results: list[dict], fail_under: float | None, fail_if_no_gain: bool = False) -> dict:
    """``{"fail_under", "passed", "below": [{"model", "mean"}], "no_gain": [model]}``: the distilled means under
    ``--fail-under`` % and the models whose distillation did not help (failing with ``--fail-if-no-gain``)."""
    below = [
        {"model": r["model"], "mean": r["mean"]}
        for r in results
        if fail_under is not None and r["source"] == "distilled" and 100 * r["mean"] < fail_under
    ]
    no_gain = [r["model"] for r in results if r["source"] == "distilled" and r.get("no_gain")]
    passed = not below and not (fail_if_no_gain and no_gain)
    return {"fail_under": fail_under, "passed": passed, "below": below, "no_gain": no_gain}


def random_subset(labels: torch.Tensor, n_classes: int, per_class: int, seed: int) -> torch.Tensor:
    """Indices of a seeded, class-balanced random subset (``per_class`` of each class)."""
    counts = torch.bincount(labels, minlength=n_classes)
    if int(counts.min()) < per_class:
        c = int(counts.argmin())
        raise DataError(
            f"The random baseline needs {plural(per_class, 'image')} of class {c}, the training set has {int(counts[c])}."
        )
    return torch.cat(class_balanced(labels, n_classes, per_class, torch.Generator().manual_seed(seed)))


class TrainResult(NamedTuple):
    accuracy: float  # on the test set
    diverged_epoch: int | None  # first epoch whose training loss was NaN/Inf
    val_accuracy: float | None  # on the validation split, when there is one


def epochs_run(epochs: int) -> tuple[int, int]:
    """MTT's schedule for ``--epochs E``: ``(E + 1 epochs run, E // 2 + 2 of them before the lr drops)``.

    MTT's ``evaluate_synset`` loops ``for ep in range(E + 1)`` and drops the lr after the epoch of index
    ``E // 2 + 1`` (for E = 1 or 2 that is after the last epoch, so it never takes effect).
    """
    return epochs + 1, epochs // 2 + 2


def _train(spec, xs, ys, epochs, lrs, s: EvalSettings, seeds, device, on_epoch) -> tuple:
    """Train fresh networks, one per seed, with MTT's evaluation loop (docs/algorithm.md, "Evaluation protocols").

    ``epochs`` is MTT's E (``epochs_run``); the lr drops x0.1 by building a new optimiser, so the momentum
    restarts from zero, as in MTT. Member k trains on ``(xs[k], ys[k])`` at ``lrs[k]`` from the network that
    ``torch.manual_seed(seeds[k])`` builds; several (of one image count) train as one ``Stack``, each with its own
    shuffles and DSA draws, so each ends as it would alone, up to rounding. ``on_epoch(epoch, loss_sums)`` runs
    after every epoch, 1-based. Returns ``(network or Stack, each member's first epoch whose loss was NaN/Inf or None)``.
    """
    if len(ys) > 1 and any(y.dim() == 2 for y in ys):  # soft and hard labels together: hard ones as probabilities
        ys = [y if y.dim() == 2 else F.one_hot(y, spec.n_classes).to(xs[0].dtype) for y in ys]
    net, x, y, gen, rng = fresh(spec, seeds, device, xs, ys)
    n_epochs, decay_after = epochs_run(epochs)
    opt = sgd(net, lrs, s.momentum, s.weight_decay)
    losses = []  # each epoch's summed losses, kept on the device: checked once, after the last epoch
    for epoch in range(1, n_epochs + 1):
        interrupt.check("evaluation stopped")  # run() re-raises with what was kept
        loss_sum, _ = train_epoch(net, opt, x, y, s.batch, gen, rng, s.dsa, count_correct=False)
        if epoch == decay_after:
            opt = sgd(net, [lr * 0.1 for lr in lrs], s.momentum, s.weight_decay)  # zero momentum, as MTT
        losses.append(loss_sum)
        on_epoch(epoch, loss_sum)
    bad = ~torch.isfinite(torch.stack(losses).view(n_epochs, -1))
    return net, [int(col.nonzero()[0, 0]) + 1 if col.any() else None for col in bad.T]


def _train_and_test(
    spec, xs, ys, x_test, y_test, epochs, lrs, s: EvalSettings, seeds, device, on_epoch, x_val=None, y_val=None
) -> list[TrainResult]:
    """``_train``, then test once (and measure on the validation split if given); a diverged run still counts."""
    net, diverged = _train(spec, xs, ys, epochs, lrs, s, seeds, device, on_epoch)
    val = [None] * len(seeds) if x_val is None else _listed(accuracy(net, x_val, y_val))
    return [TrainResult(*r) for r in zip(_listed(accuracy(net, x_test, y_test)), diverged, val)]


def _listed(acc) -> list[float]:
    return acc if isinstance(acc, list) else [acc]


@dataclass
class _Set:
    """One set of images to train on: a checkpoint, the final synthetic set, or a baseline's source."""

    source: str  # distilled | random | full | init
    iteration: int | None  # the checkpoint's iteration (distilled and init)
    path: Path | None
    tensors: dict | None = None


def _targets(target: Path) -> tuple[Path, Path | None]:
    """(the file whose set is reported as "final", the run directory or None for a bare file)."""
    if not str(target).strip():
        raise StorageError(f"The target is empty. {_TARGET_HINT}")
    target = Path(target)
    if not target.exists():
        raise StorageError(f"{target} does not exist. {_TARGET_HINT}")
    refuse_running(target, "evaluate that checkpoint by naming it: `dpd evaluate {checkpoint}`")
    if not target.is_dir():
        return target, None
    if experts_file.is_folder(target):
        raise StorageError(
            f"{target} is an experts folder (from `dpd experts`): it holds training trajectories, not a "
            f"synthetic set. Distil one from it with `dpd distill --experts {target}`, then evaluate the "
            "run directory that `dpd distill` writes."
        )
    if not (target / layout.SYNTHETIC).exists():
        raise StorageError(
            f"{target} has no {layout.SYNTHETIC}: it is not a finished or checkpointed run. Run `dpd distill --out {target}` (or --resume) first."
        )
    return target / layout.SYNTHETIC, target


def _choose_select(s: EvalSettings, run_dir: Path | None, checkpoints: list[Path], has_val: bool) -> str:
    """The --select mode in force; refuses the combinations that cannot work, saying what would."""
    n = len(checkpoints)
    if s.select is None:
        return "val" if has_val and n > 1 and s.distilled else "final"
    if s.select == "final":
        return "final"
    if run_dir is None:
        raise SettingsError(
            f"--select {s.select} compares a run's checkpoints: give the run directory, not a single file."
        )
    if n <= 1:
        raise SettingsError(
            f"--select {s.select} picks among a run's kept checkpoints, but {run_dir} keeps {n}. Distil with "
            "--keep-checkpoints all (or N) to keep them, or use --select final."
        )
    if s.select == "val" and not has_val:
        raise SettingsError(
            f"--select val needs a validation split, and {run_dir} has none. Train experts and distil with "
            "--val-per-class K (e.g. 50) to hold one out, use --select final, or --select test-max (optimistic)."
        )
    return s.select


def run(settings: EvalSettings, target: Path, sink: Sink | None = None) -> dict:
    """Evaluate the synthetic set in ``target`` (a run dir, synthetic.safetensors or a checkpoint).

    With ``--select val`` or ``test-max`` every kept checkpoint of the run is trained on (the same network
    seeds for each), and the one with the best mean validation (or test) accuracy is reported.

    Returns:
        ``{"target", "eval_file", "results", "warnings", "fail_under", "passed", "below"}``: the entries as
        stored in eval.json, sentences on a distilled set below its baselines, and ``verdict``'s keys.
    """
    s, sink = settings, sink or NullSink()
    file, run_dir = _targets(target)
    target, out_file = Path(target), eval_path(target)
    if not os.access(out_file.parent, os.W_OK):  # refused before any training, not after
        what = "run directory" if run_dir else "file"
        raise StorageError(
            f"Cannot write {out_file}: {out_file.parent} is read-only, and `dpd evaluate` writes its "
            f"results next to the {what} it evaluates. Copy the {what} to a writable folder and evaluate the copy "
            f"(cp -r {target} COPY && dpd evaluate COPY), or make the folder writable."
        )
    tensors, meta = synthetic_file.load(file)
    validation = meta.get("validation") or None
    checkpoints = sorted(layout.checkpoints(run_dir), key=layout.checkpoint_iteration) if run_dir is not None else []
    select = _choose_select(s, run_dir, checkpoints, validation is not None)
    device = prepare_runtime(s.threads, s.device, s.deterministic)
    data_dir = s.data_dir or meta.get("settings", {}).get("data_dir")
    val_per_class = validation["per_class"] if validation else None
    ds = load_dataset(meta["dataset"], Path(data_dir) if data_dir else None, val_per_class=val_per_class)
    if validation and ds.val_fingerprint != validation.get("fingerprint"):
        raise DataError(
            f"The validation split of dataset {ds.name} is not the one {file} was distilled with (the dataset "
            "changed?). Point --data-dir at the dataset the run used."
        )
    pre = Preprocess.from_tensors(tensors)
    base_spec = ModelSpec.from_dict(meta["model"])
    _check_dataset(ds, base_spec, tensors, meta)
    test = (pre.apply(ds.test_images).to(device), ds.test_labels.to(device))
    val = (pre.apply(ds.val_images).to(device), ds.val_labels.to(device)) if validation else (None, None)
    epochs = s.epochs or PROTOCOLS[s.protocol]["epochs"]
    fixed_lr = s.lr if s.lr is not None else PROTOCOLS[s.protocol]["lr"]  # None: each set's learned alpha
    ipc = int(meta.get("ipc") or len(tensors["labels"]) // base_spec.n_classes)

    # The sets: the final set, or every kept checkpoint; then the baselines.
    sets: list[_Set] = []
    if s.distilled and select == "final":
        sets.append(_Set("distilled", meta.get("iteration"), file, tensors))
    elif s.distilled:
        sets += [_Set("distilled", layout.checkpoint_iteration(p), p) for p in checkpoints]
    for b in s.baseline:
        zero = layout.checkpoint_path(run_dir, 0) if b == "init" and run_dir is not None else None
        if b == "init" and (zero is None or not zero.exists()):
            raise StorageError(
                f"--baseline init trains on the run's initial images, kept in checkpoint 0, which "
                f"{'a bare file has no' if run_dir is None else str(run_dir) + ' lacks (distilled by dpd 0.1?)'}. "
                "Give a run directory distilled by this dpd, or leave init out."
            )
        sets.append(_Set(b, 0 if b == "init" else None, zero))
    for st in sets:
        if st.path is not None and st.tensors is None:
            st.tensors, _ = synthetic_file.load(st.path)
            if Preprocess.from_tensors(st.tensors).fingerprint() != pre.fingerprint():
                raise StorageError(f"{st.path} was written with another preprocessing than {file}: not the same run.")

    def lr_for(st: _Set) -> float:
        if fixed_lr is not None:
            return fixed_lr
        if st.source == "distilled":
            return float(st.tensors["lr"])  # each checkpoint trains at the step size it had learned then
        return float(tensors["lr"]) if st.source == "init" else _BASELINE_LR  # init: the final set's alpha

    full: list = []  # the full training set, moved to the device once

    def data_for(st: _Set, r: int):
        if st.tensors is not None:  # soft labels, where the set learned them; the baselines' labels stay hard
            return st.tensors["images"].to(device), synthetic_file.soft_targets(st.tensors).to(device)
        if st.source == "random":
            idx = random_subset(ds.train_labels, ds.n_classes, ipc, derive_seed(s.seed, "random-subset", r))
            return pre.apply(ds.train_images[idx]).to(device), ds.train_labels[idx].to(device)
        if not full:
            full.extend((pre.apply(ds.train_images).to(device), ds.train_labels.to(device)))
        return tuple(full)

    def n_images(st: _Set) -> int:
        if st.source == "full":
            return len(ds.train_labels)
        return len(st.tensors["labels"]) if st.tensors is not None else ipc * ds.n_classes

    def train(members: list[tuple[_Set, str, int]], total: int) -> list[dict]:
        """The outcomes of trainings of one model, image count and ``total`` epochs, trained as one (``_train``)."""
        first, m, first_run = members[0]
        seeds = [derive_seed(s.seed, "distilled" if st.source == "init" else st.source, m, r) for st, _, r in members]
        xs, ys = map(list, zip(*(data_for(st, r) for st, _, r in members)))
        lrs = [lr_for(st) for st, _, _ in members]
        t0 = time.perf_counter()

        def on_epoch(epoch, loss_sums):  # the first member's loss stands for the group
            if epoch == total or epoch % max(1, total // 50) == 0:
                loss = float(loss_sums.view(-1)[0]) / len(ys[0])
                sink.emit(EvalEpoch(first.source, m, first_run, epoch, total, loss, first.iteration, len(members)))

        spec = replace(base_spec, name=m)
        res = _train_and_test(spec, xs, ys, *test, total - 1, lrs, s, seeds, device, on_epoch, *val)
        seconds = (time.perf_counter() - t0) / len(members)  # each member's share of the time
        return [
            {"source": st.source, "model": m, "run": r, **o._asdict(), "seed": seed, "seconds": seconds}
            | {"epochs": total - 1, "lr": lr, "iteration": st.iteration}
            for (st, _, r), o, seed, lr in zip(members, res, seeds, lrs)
        ]

    with contextlib.ExitStack() as stack:
        # Under torchrun: the process group now, with its timeout (ranks that fail end the job), left at the end.
        group = parallel.start(device, s.dist_timeout)
        stack.callback(parallel.stop)
        rank, world = (group.rank, group.world) if group is not None else (0, 1)
        sink = sink if rank == 0 else NullSink()
        mine = [(st, m, r) for st in sets for m in s.models for r in range(s.runs)][rank::world]
        jobs = [(st.source, m, r, st.iteration) for st, m, r in mine]
        sink.emit(EvalStarted(jobs, epochs + 1, str(device), select if s.distilled else None))
        partial = evaluation.partial_path(out_file)  # finished trainings of an interrupted evaluation
        fingerprints = {id(st): _fingerprint(st.tensors) if st.tensors is not None else None for st in sets}
        keys = {(id(st), m, r): _job_key(s, fingerprints[id(st)], st.source, m, r) for st, m, r in mine}
        lock = f".{out_file.name}.lock"  # under torchrun: shared by the ranks, plus .<name>.rank<r>.lock each
        stack.enter_context(storage.lock_shard(out_file.parent, f"an evaluation of {file}", rank, world, lock, _WAIT))
        stack.enter_context(interrupt.safe_points())
        done = evaluation.read_partial(partial, {k: job for job, k in keys.items()})
        if done:
            sink.emit(Message(f"Reusing {plural(len(done), 'finished training')} from {partial}."))
        outcomes = [{**done[job], "iteration": st.iteration} for st, m, r in mine if (job := (id(st), m, r)) in done]
        # The rest in groups of at most --concurrent trainings that share a model, an epoch and an image count.
        alike: dict[tuple, list] = {}
        for st, m, r in mine:
            if (id(st), m, r) not in done:
                n_epochs = s.full_epochs if st.source == "full" else epochs
                alike.setdefault((m, n_epochs + 1, n_images(st)), []).append((st, m, r))
        k = s.concurrent or CONCURRENT[device.type == "cuda"]
        for (_, total, _), jobs_alike in alike.items():
            for i in range(0, len(jobs_alike), k):
                try:
                    trained = train(jobs_alike[i : i + k], total)
                except interrupt.Interrupted:
                    raise _stopped(len(outcomes), partial) from None
                for (st, m, r), o in zip(jobs_alike[i : i + k], trained):
                    evaluation.append_partial(partial, keys[id(st), m, r], o)
                    outcomes.append(o)
                    sink.emit(EvalRunDone(**{f.name: o[f.name] for f in fields(EvalRunDone)}))  # all in the outcome
        if group is not None:
            outcomes = [o for part in group.gather_objects(outcomes) for o in part]
        if rank != 0:
            return _result(target, None, [], [], s)
        common = {
            "protocol": s.protocol,
            "protocol_version": PROTOCOL_VERSION,
            "ipc": ipc,
            "dataset": ds.name,
            "synthetic": str(file),
            "synthetic_fingerprint": _fingerprint(tensors),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "settings": s.model_dump(mode="json"),
            "versions": versions(),
        }
        entries = []
        for source in dict.fromkeys(st.source for st in sets):
            for m in s.models:
                rows = [o for o in outcomes if o["source"] == source and o["model"] == m]
                if source == "distilled":
                    entries.append({**_distilled_entry(rows, select, meta.get("iteration")), **common})
                else:
                    iteration = 0 if source == "init" else None
                    entries.append({**_summary(rows), "source": source, "model": m, **common, "iteration": iteration})
        warnings = _below_baselines(entries) + _no_gain(entries, meta.get("settings", {}).get("lr_img"))
        evaluation.append(out_file, entries)
        partial.unlink(missing_ok=True)
    sink.emit(EvalDone(entries))
    return _result(target, out_file, entries, warnings, s)


def _stopped(n_done: int, partial: Path) -> interrupt.Interrupted:
    """The interruption's message: how many finished trainings ``partial`` keeps for a rerun."""
    kept = f"{plural(n_done, 'finished training')} {'is' if n_done == 1 else 'are'} kept in {partial}"
    kept = kept if n_done else "no training had finished"
    return interrupt.Interrupted(f"evaluation stopped; {kept}. Rerun the same command to continue")


def previous(settings: EvalSettings, target: Path) -> dict | None:
    """What ``run(settings, target)`` returns, read from the eval.json of an earlier call that evaluated the
    same synthetic set with the same settings (all but where and how fast it ran); None if there is none."""
    file, _ = _targets(target)
    out_file = eval_path(target)
    if not out_file.exists():
        return None
    tensors, _ = synthetic_file.load(file)
    mine = {"fingerprint": _fingerprint(tensors), **_comparable(settings.model_dump(mode="json"))}
    latest = {(e.get("source"), e.get("model")): e for e in load_eval(out_file)["results"] if isinstance(e, dict)}
    sources = (["distilled"] if settings.distilled else []) + list(dict.fromkeys(settings.baseline))
    entries = [latest.get((src, m)) for src in sources for m in settings.models]
    if any(
        e is None
        or e.get("protocol_version") != PROTOCOL_VERSION
        or {"fingerprint": e.get("synthetic_fingerprint"), **_comparable(e.get("settings") or {})} != mine
        for e in entries
    ):
        return None
    entries = [{k: v for k, v in e.items() if k != "below_baselines"} for e in entries]
    notes = [e["no_gain"]["message"] for e in entries if isinstance(e.get("no_gain"), dict)]
    return _result(target, out_file, entries, _below_baselines(entries) + notes, settings)


def _comparable(settings: dict) -> dict:
    """Evaluation settings without those that change only where and how fast it runs, or its verdict."""
    return {k: v for k, v in settings.items() if k not in _NOT_IN_RESULT}


def _result(target: Path, out_file: Path | None, entries: list[dict], warnings: list[str], s: EvalSettings) -> dict:
    head = {"target": str(target), "eval_file": str(out_file) if out_file else None, "results": entries}
    return {**head, "warnings": warnings, **verdict(entries, s.fail_under, s.fail_if_no_gain)}


def _check_dataset(ds, spec: ModelSpec, tensors: dict, meta: dict) -> None:
    if ds.n_classes != spec.n_classes or tuple(ds.image_shape) != tuple(tensors["images"].shape[1:]):
        raise DataError(
            f"The synthetic set ({tuple(tensors['images'].shape[1:])} images, {spec.n_classes} classes) does not fit "
            f"dataset {ds.name} ({ds.image_shape}, {ds.n_classes} classes). Check --data-dir."
        )
    if list(meta["classes"]) != list(ds.classes):
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(meta["classes"], ds.classes)) if a != b]
        raise DataError(
            f"The synthetic set's classes differ from those of dataset {ds.name} (label {'; '.join(diff[:3])}"
            f"{'; ...' if len(diff) > 3 else ''}): its labels would be scored against the wrong classes. Check --data-dir."
        )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _summary(rows: list[dict]) -> dict:
    """mean ± population std (as MTT reports) of one set's trainings, with everything per run."""
    rows = sorted(rows, key=lambda o: o["run"])
    accs = [o["accuracy"] for o in rows]
    mean = _mean(accs)
    vals = [o.get("val_accuracy") for o in rows]
    return {
        "model": rows[0]["model"],
        "epochs": rows[0]["epochs"],
        "lr": rows[0]["lr"],
        "runs": len(accs),
        "accuracies": accs,
        "mean": mean,
        "std": math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs)),
        "seeds": [o["seed"] for o in rows],
        "diverged_runs": [o["run"] for o in rows if o.get("diverged_epoch")],
        "seconds_per_run": _mean([o["seconds"] for o in rows]),
        "val_accuracy": _mean(vals) if all(v is not None for v in vals) else None,
    }


def _distilled_entry(rows: list[dict], select: str, final_iteration: int | None) -> dict:
    """The distilled set's entry: the selected checkpoint's summary, the final one's accuracy, every checkpoint's means."""
    rows = sorted(rows, key=lambda o: -1 if o["iteration"] is None else o["iteration"])
    per = {it: _summary(list(group)) for it, group in itertools.groupby(rows, key=lambda o: o["iteration"])}
    final_it = list(per)[-1]
    if select == "final":
        chosen = final_it
    else:  # val or test-max; ties: the later checkpoint
        chosen = max(per, key=lambda it: (per[it]["val_accuracy" if select == "val" else "mean"], it))
    entry = {
        **per[chosen],
        "source": "distilled",
        "select": select,
        "selected_iteration": chosen,
        "iteration": chosen if chosen is not None else final_iteration,
        "final_accuracy": per[final_it]["mean"],
        "optimistic": select == "test-max",
    }
    if len(per) > 1:
        keys = ("mean", "std", "val_accuracy", "accuracies", "lr")
        entry["checkpoints"] = [{"iteration": it, **{k: v[k] for k in keys}} for it, v in per.items()]
    return entry


def _below_baselines(entries: list[dict]) -> list[str]:
    """Warnings for a distilled set below the random baseline by more than the larger of the two spreads (against
    its own initial images, ``_no_gain`` compares network by network)."""
    notes = []
    for d in (e for e in entries if e["source"] == "distilled"):
        for b in (e for e in entries if e["source"] == "random" and e["model"] == d["model"]):
            gap = b["mean"] - d["mean"]
            if gap > max(d["std"], b["std"]):
                notes.append(
                    f"The distilled set ({d['model']}) scores {100 * d['mean']:.2f}%, {100 * gap:.2f} points below "
                    f"random real images ({100 * b['mean']:.2f}%) trained the same way: distillation made these images worse. Check the "
                    "learning rates (--lr-img, --lr-teacher) and the experts' accuracy."
                )
                d.setdefault("below_baselines", []).append(b["source"])
    return notes


def _no_gain(entries: list[dict], lr_img: float | None) -> list[str]:
    """Mark (``no_gain``) and explain each distilled entry whose distillation did not help: ``--select`` chose
    checkpoint 0, the initial images, or the final set scores below them beyond noise, i.e. the 95 % t-interval of
    the per-network differences (final minus initial; the same network seeds train both) lies below 0. The initial
    images are checkpoint 0 among the selected checkpoints, else the ``init`` baseline."""
    notes = []
    for d in (e for e in entries if e["source"] == "distilled"):
        init = next((e for e in entries if e["source"] == "init" and e["model"] == d["model"]), None)
        points = d.get("checkpoints") or ([init, d] if init is not None and init["seeds"] == d["seeds"] else [])
        if len(points) < 2 or points[0]["iteration"] != 0:
            continue
        first, last = points[0], points[-1]
        diff = stats.paired([b - a for a, b in zip(first["accuracies"], last["accuracies"], strict=True)])
        chose_initial = d["select"] in ("val", "test-max") and d["selected_iteration"] == 0
        if not chose_initial and (diff["ci"] is None or diff["ci"][1] >= 0):
            continue
        why = (
            f"--select {d['select']} chose checkpoint 0, the untouched initial images: the {100 * d['mean']:.2f}% "
            "reported is theirs"
            if chose_initial
            else "the final set scores below its own initial images (checkpoint 0) beyond noise"
        )
        spread = (
            "" if diff["ci"] is None else f", 95% interval [{100 * diff['ci'][0]:+.2f}, {100 * diff['ci'][1]:+.2f}]"
        )
        smaller = f"e.g. {lr_img / 10:g}, a tenth of this run's {lr_img:g}" if lr_img else "e.g. a tenth"
        curve = [{"iteration": p["iteration"], "mean": p["mean"]} for p in points]
        d["no_gain"] = {
            "reason": "selected_initial" if chose_initial else "final_below_initial",
            "initial": first["mean"],
            "final": last["mean"],
            "final_iteration": last["iteration"],
            "selected": d["mean"],
            "selected_iteration": d["selected_iteration"],
            "difference": {"n": diff["n"], "mean": diff["mean"], "ci95": diff["ci"]},
            "curve": curve,
            "message": (
                f"{d['model']}: distillation did not help: {why}. Test accuracy (%) by iteration: "
                + ", ".join(f"{c['iteration']}: {100 * c['mean']:.2f}" for c in curve)
                + f" (final minus initial {100 * diff['mean']:+.2f} points over {diff['n']} networks{spread}). "
                f"Too large an image step can do this: try a smaller --lr-img ({smaller}); DPD pruning (--prune-ratio "
                "0.01 or 0.05) or --clip-img kept 0.2-1.1 of the points MTT lost at a tenfold step (docs/results.md)."
            ),
        }
        notes.append(d["no_gain"]["message"])
    return notes


# Settings that only choose which trainings run (or where): a finished training is reused across them.
_NOT_IN_JOB_KEY = set(
    "device threads fail_under fail_if_no_gain data_dir models runs baseline distilled select dist_timeout host_memory "
    "deterministic concurrent".split()
)


# Settings that change neither which trainings run nor their results.
_NOT_IN_RESULT = _NOT_IN_JOB_KEY - set("models runs baseline distilled select".split())


def _fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _job_key(s: EvalSettings, fingerprint: str, src: str, model: str, run: int) -> str:
    """One training's identity: the synthetic set, every setting that changes its result, the loop's version
    (a rerun never reuses a training made by an older loop) and (source, model, run)."""
    data = {
        "settings": s.model_dump(mode="json", exclude=_NOT_IN_JOB_KEY & set(type(s).model_fields)),
        "synthetic": fingerprint,
        "protocol_version": PROTOCOL_VERSION,
        "job": [src, model, run],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
