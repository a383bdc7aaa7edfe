"""``dpd evaluate``: train fresh networks on a synthetic set and test them on the real test set.

The test images go through the synthetic set's own normalisation and ZCA (stored in the
file), exactly as the training images did. Each reported accuracy is the final network's
(never the best over test evaluations). Baselines use the identical protocol:

* ``random``: a seeded, class-balanced random subset of the real training set with the
  same images per class;
* ``full``: all real training data, ``full_epochs`` epochs.

Every network trains with MTT's ``evaluate_synset`` loop (``_train``): ``--epochs E`` runs
E + 1 epochs and the lr drops x0.1, momentum restarting, after epoch E // 2 + 2. Under the
``mtt`` protocol the distilled set trains at its learned alpha; baselines have no learned
alpha and train at the fixed protocol's lr (0.01). Every entry records its lr.

Under torchrun, the (source, model, run) trainings are sharded across ranks and gathered
on rank 0, which writes ``eval.json``.

Each finished training is appended to ``eval.partial.jsonl`` next to ``eval.json``, keyed by
the synthetic set's content, the settings that change its result and the loop's version
(``PROTOCOL_VERSION``); an interrupted
evaluation rerun with the same command reuses them, and the file is removed once
``eval.json`` is written. A lock file keeps two evaluations from writing the same results.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from dpd_cli import interrupt
from dpd_cli.artifacts import evaluation, layout
from dpd_cli.artifacts import experts as experts_file
from dpd_cli.artifacts import synthetic as synthetic_file
from dpd_cli.artifacts.evaluation import EVAL_FILE  # noqa: F401  (re-exported)
from dpd_cli.artifacts.evaluation import load as load_eval  # noqa: F401  (re-exported)
from dpd_cli.artifacts.evaluation import path_for as eval_path
from dpd_cli.artifacts.layout import SYNTHETIC
from dpd_cli.config.settings import EvalSettings
from dpd_cli.core import parallel
from dpd_cli.core.train import accuracy, train_epoch
from dpd_cli.data import Preprocess, load_dataset
from dpd_cli.data.datasets import class_balanced
from dpd_cli.errors import DataError, SettingsError, StorageError
from dpd_cli.events import EvalDone, EvalEpoch, EvalRunDone, EvalStarted, Message, NullSink, Sink
from dpd_cli.io import storage
from dpd_cli.io.provenance import versions
from dpd_cli.models import ModelSpec, build_model
from dpd_cli.recipes.runtime import derive_seed, prepare_runtime

__all__ = [
    "run",
    "verdict",
    "EVAL_FILE",
    "PROTOCOLS",
    "PROTOCOL_VERSION",
    "epochs_run",
    "random_subset",
    "load_eval",
    "eval_path",
]

#: Protocol defaults: E (``--epochs``; E + 1 epochs run, see ``_train``) and lr (None = the learned alpha).
#: Both protocols run the same loop, MTT's ``evaluate_synset``; they differ only in these two values.
PROTOCOLS = {"mtt": {"epochs": 1000, "lr": None}, "fixed": {"epochs": 300, "lr": 0.01}}
#: The training loop's version, part of every job key and eval.json entry. Version 1 (dpd 0.1.0)
#: trained E epochs with ``MultiStepLR`` at E // 2 and kept the momentum; version 2 is MTT's loop.
PROTOCOL_VERSION = 2
_BASELINE_LR = 0.01


def verdict(results: list[dict], fail_under: float | None) -> dict:
    """Whether every distilled mean accuracy reaches ``fail_under`` percent (``--fail-under``).

    Returns:
        ``{"fail_under", "passed", "below": [{"model", "mean"}, ...]}``: ``passed`` is True when no
        threshold is given; means are fractions, as in eval.json.
    """
    below = [
        {"model": r["model"], "mean": r["mean"]}
        for r in results
        if fail_under is not None and r["source"] == "distilled" and 100 * r["mean"] < fail_under
    ]
    return {"fail_under": fail_under, "passed": not below, "below": below}


def random_subset(labels: torch.Tensor, n_classes: int, per_class: int, seed: int) -> torch.Tensor:
    """Indices of a seeded, class-balanced random subset (``per_class`` of each class)."""
    counts = torch.bincount(labels, minlength=n_classes)
    if int(counts.min()) < per_class:
        c = int(counts.argmin())
        raise DataError(
            f"The random baseline needs {per_class} images of class {c}, the training set has {int(counts[c])}."
        )
    return torch.cat(class_balanced(labels, n_classes, per_class, torch.Generator().manual_seed(seed)))


class TrainResult(NamedTuple):
    test_accuracy: float
    diverged_epoch: int | None  # first epoch whose training loss was NaN/Inf
    val_accuracy: float | None  # on the validation split, when there is one


def epochs_run(epochs: int) -> tuple[int, int]:
    """MTT's schedule for ``--epochs E``: ``(epochs that run, epochs done before the lr drops)``.

    MTT's ``evaluate_synset`` loops ``for ep in range(E + 1)`` and drops the lr after the epoch
    of index ``E // 2 + 1``: E + 1 epochs, the first ``E // 2 + 2`` at the initial lr (for
    E = 1 or 2 the drop falls after the last epoch, so it never takes effect).
    """
    return epochs + 1, epochs // 2 + 2


def _sgd(net, lr: float, s: EvalSettings) -> torch.optim.SGD:
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)


def _train(spec, x, y, epochs, lr, s: EvalSettings, seed, device, on_epoch) -> tuple[torch.nn.Module, int | None]:
    """Train one fresh network with MTT's evaluation loop (docs/algorithm.md, "Evaluation protocols").

    ``epochs`` is MTT's E: E + 1 epochs of SGD at ``lr``, which drops x0.1 after epoch
    ``E // 2 + 2`` (1-based; ``epochs_run``) by building a new optimiser, so the momentum
    restarts from zero, as MTT re-creates its optimiser there. ``on_epoch(epoch, loss_sum)``
    runs after every epoch, 1-based.

    Returns:
        ``(network, first epoch whose loss was NaN/Inf or None)``.
    """
    torch.manual_seed(seed)
    net = build_model(spec).to(device)
    n_epochs, decay_after = epochs_run(epochs)
    opt = _sgd(net, lr, s)
    gen = torch.Generator().manual_seed(seed)  # the shuffles
    rng = random.Random(seed)  # one DSA seed per batch
    losses = []  # each epoch's summed loss, kept on the device: checked once, after the last epoch
    for epoch in range(1, n_epochs + 1):
        interrupt.check("evaluation stopped")  # run() re-raises with what was kept
        loss_sum, _ = train_epoch(net, opt, x, y, s.batch, gen, rng, s.dsa, count_correct=False)
        if epoch == decay_after:
            opt = _sgd(net, lr * 0.1, s)  # a fresh optimiser: zero momentum, as MTT
        losses.append(loss_sum)
        on_epoch(epoch, loss_sum)
    bad = (~torch.isfinite(torch.stack(losses))).nonzero()
    return net, (int(bad[0, 0]) + 1 if len(bad) else None)


def _train_and_test(
    spec, x, y, x_test, y_test, epochs, lr, s: EvalSettings, seed, device, on_epoch, x_val=None, y_val=None
) -> TrainResult:
    """Train one fresh network (``_train``) and test it once, after its last epoch (and measure it on the
    validation split if given).

    A diverged network still counts at the accuracy it ends with (no run is ever dropped from a mean).
    """
    net, diverged = _train(spec, x, y, epochs, lr, s, seed, device, on_epoch)
    val = accuracy(net, x_val, y_val) if x_val is not None else None
    return TrainResult(accuracy(net, x_test, y_test), diverged, val)


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
        raise StorageError(
            "The target is empty. Give a run directory (from `dpd distill`) or a synthetic.safetensors file."
        )
    target = Path(target)
    if not target.exists():
        raise StorageError(
            f"{target} does not exist. Give a run directory (from `dpd distill`) or a synthetic.safetensors file."
        )
    if not target.is_dir():
        return target, None
    if experts_file.is_folder(target):
        raise StorageError(
            f"{target} is an experts folder (from `dpd experts`): it holds training trajectories, not a "
            f"synthetic set. Distil one from it with `dpd distill --experts {target}`, then evaluate the "
            "run directory that `dpd distill` writes."
        )
    file = target / SYNTHETIC
    if not file.exists():
        raise StorageError(
            f"{target} has no {SYNTHETIC}: it is not a finished or checkpointed run. Run `dpd distill --out {target}` (or --resume) first."
        )
    return file, target


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

    With ``--select val`` or ``test-max`` every kept checkpoint of the run is trained on (the same
    network seeds for each), and the one with the best mean validation (or test) accuracy is reported.

    Returns:
        ``{"target", "eval_file", "results": [entry, ...], "warnings", "fail_under", "passed", "below"}``: entries
        as stored in eval.json, sentences on a distilled set below its baselines, and the ``--fail-under``
        verdict (``verdict``).

    Raises:
        UserError: Unreadable synthetic set, dataset problems, bad device, impossible selection.
    """
    s = settings
    sink = sink or NullSink()
    file, run_dir = _targets(target)
    target = Path(target)
    tensors, meta = synthetic_file.load(file)
    validation = meta.get("validation") or None
    checkpoints = sorted(layout.checkpoints(run_dir), key=layout.checkpoint_iteration) if run_dir is not None else []
    select = _choose_select(s, run_dir, checkpoints, validation is not None)
    device = prepare_runtime(s.threads, s.device, s.host_memory, s.deterministic)
    run_settings = meta.get("settings", {})
    data_dir = s.data_dir or run_settings.get("data_dir")
    ds = load_dataset(
        meta["dataset"],
        Path(data_dir) if data_dir else None,
        val_per_class=validation["per_class"] if validation else None,
    )
    if validation and ds.val_fingerprint != validation.get("fingerprint"):
        raise DataError(
            f"The validation split of dataset {ds.name} is not the one {file} was distilled with (the dataset "
            "changed?). Point --data-dir at the dataset the run used."
        )
    pre = Preprocess.from_tensors(tensors)
    base_spec = ModelSpec.from_dict(meta["model"])
    _check_dataset(ds, base_spec, tensors, meta)
    x_test = pre.apply(ds.test_images).to(device)
    y_test = ds.test_labels.to(device)
    x_val = pre.apply(ds.val_images).to(device) if validation else None
    y_val = ds.val_labels.to(device) if validation else None

    protocol = PROTOCOLS[s.protocol]
    epochs = s.epochs or protocol["epochs"]
    learned_lr = float(tensors["lr"])
    ipc = int(meta.get("ipc") or len(tensors["labels"]) // base_spec.n_classes)

    # The sets: the final set, or every kept checkpoint; then the baselines.
    sets: list[_Set] = []
    if s.distilled:
        if select == "final":
            sets.append(_Set("distilled", meta.get("iteration"), file, tensors))
        else:
            sets += [_Set("distilled", layout.checkpoint_iteration(p), p) for p in checkpoints]
    for b in s.baseline:
        if b == "init":
            zero = layout.checkpoint_path(run_dir, 0) if run_dir is not None else None
            if zero is None or not zero.exists():
                raise StorageError(
                    f"--baseline init trains on the run's initial images, kept in checkpoint 0, which "
                    f"{'a bare file has no' if run_dir is None else str(run_dir) + ' lacks (distilled by dpd 0.1?)'}. "
                    "Give a run directory distilled by this dpd, or leave init out."
                )
            sets.append(_Set("init", 0, zero))
        else:
            sets.append(_Set(b, None, None))
    for st in sets:
        if st.path is not None and st.tensors is None:
            st.tensors, _ = synthetic_file.load(st.path)
            if Preprocess.from_tensors(st.tensors).fingerprint() != pre.fingerprint():
                raise StorageError(f"{st.path} was written with another preprocessing than {file}: not the same run.")

    jobs = [(st, m, r) for st in sets for m in s.models for r in range(s.runs)]
    with contextlib.ExitStack() as stack:
        # Under torchrun: the process group now, with its timeout (ranks that fail end the job), left at the end.
        group = parallel.start(device, s.dist_timeout)
        stack.callback(parallel.stop)
        return _evaluate(
            s,
            sink,
            group,
            target,
            file,
            meta,
            tensors,
            pre,
            ds,
            base_spec,
            sets,
            jobs,
            select,
            validation,
            x_test,
            y_test,
            x_val,
            y_val,
            device,
            epochs,
            protocol,
            learned_lr,
            ipc,
        )


def _evaluate(
    s,
    sink,
    group,
    target,
    file,
    meta,
    tensors,
    pre,
    ds,
    base_spec,
    sets,
    jobs,
    select,
    validation,
    x_test,
    y_test,
    x_val,
    y_val,
    device,
    epochs,
    protocol,
    learned_lr,
    ipc,
) -> dict:
    """Train this rank's share of ``jobs``; rank 0 collects every rank's outcomes and writes eval.json."""
    rank, world = (group.rank, group.world) if group is not None else (0, 1)
    if rank != 0:
        sink = NullSink()
    mine = jobs[rank::world]
    sink.emit(
        EvalStarted(
            [(st.source, m, r, st.iteration) for st, m, r in mine],
            epochs_run(epochs)[0],
            str(device),
            select if s.distilled else None,
        )
    )

    data_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def data_for(st: _Set, r: int):
        if st.tensors is not None:  # soft labels, where the set learned them; the baselines' labels stay hard
            return st.tensors["images"].to(device), synthetic_file.soft_targets(st.tensors).to(device)
        if st.source == "random":
            idx = random_subset(ds.train_labels, ds.n_classes, ipc, derive_seed(s.seed, "random-subset", r))
            return pre.apply(ds.train_images[idx]).to(device), ds.train_labels[idx].to(device)
        if "full" not in data_cache:
            data_cache["full"] = (pre.apply(ds.train_images).to(device), ds.train_labels.to(device))
        return data_cache["full"]

    def lr_for(st: _Set) -> float:
        if s.lr is not None:
            return s.lr
        if protocol["lr"] is not None:
            return protocol["lr"]
        if st.source == "distilled":
            return float(st.tensors["lr"])  # each checkpoint trains at the step size it had learned then
        if st.source == "init":
            return learned_lr  # what distillation added: the same protocol, the final set's alpha
        return _BASELINE_LR

    out_file = eval_path(target)
    partial = evaluation.partial_path(out_file)  # finished trainings of an interrupted evaluation
    fingerprints = {id(st): _fingerprint(st.tensors) if st.tensors is not None else None for st in sets}
    keys = {(id(st), m, r): _job_key(s, fingerprints[id(st)], st.source, m, r) for st, m, r in mine}
    lock = f".{out_file.name}.lock"  # under torchrun: shared by the ranks, plus .<name>.rank<r>.lock each
    with (
        storage.lock_shard(out_file.parent, f"an evaluation of {file}", rank, world, lock, "Wait for it to finish."),
        interrupt.safe_points(),
    ):
        done = evaluation.read_partial(partial, {k: job for job, k in keys.items()})
        if done:
            sink.emit(Message(f"Reusing {len(done)} finished training(s) from {partial}."))
        outcomes = []
        for st, m, r in mine:
            job = (id(st), m, r)
            if job in done:
                outcomes.append({**done[job], "iteration": st.iteration})
                continue
            spec = ModelSpec(
                m,
                base_spec.channels,
                base_spec.image_size,
                base_spec.n_classes,
                base_spec.width,
                base_spec.depth,
                base_spec.norm,
                base_spec.pool,
            )
            n_epochs = s.full_epochs if st.source == "full" else epochs
            seed = derive_seed(s.seed, "distilled" if st.source == "init" else st.source, m, r)
            x, y = data_for(st, r)
            t0 = time.perf_counter()

            def on_epoch(epoch, loss_sum, st=st, m=m, r=r, n=len(y), total=epochs_run(n_epochs)[0]):  # E + 1 run
                if epoch == total or epoch % max(1, total // 50) == 0:
                    sink.emit(EvalEpoch(st.source, m, r, epoch, total, float(loss_sum) / n, st.iteration))

            try:
                res = _train_and_test(
                    spec, x, y, x_test, y_test, n_epochs, lr_for(st), s, seed, device, on_epoch, x_val, y_val
                )
            except interrupt.Interrupted:
                kept = (
                    f"{len(outcomes)} finished training(s) are kept in {partial}"
                    if outcomes
                    else "no training had finished"
                )
                raise interrupt.Interrupted(f"evaluation stopped; {kept}. Rerun the same command to continue") from None
            dt = time.perf_counter() - t0
            outcome = {
                "source": st.source,
                "model": m,
                "run": r,
                "accuracy": res.test_accuracy,
                "seed": seed,
                "seconds": dt,
                "epochs": n_epochs,
                "lr": lr_for(st),
                "diverged_epoch": res.diverged_epoch,
                "val_accuracy": res.val_accuracy,
                "iteration": st.iteration,
            }
            evaluation.append_partial(partial, keys[job], outcome)
            outcomes.append(outcome)
            sink.emit(
                EvalRunDone(st.source, m, r, res.test_accuracy, dt, res.diverged_epoch, st.iteration, res.val_accuracy)
            )

        if group is not None:
            outcomes = [o for part in group.gather_objects(outcomes) for o in part]
            if rank != 0:
                return {
                    "target": str(target),
                    "eval_file": None,
                    "results": [],
                    "warnings": [],
                    **verdict([], s.fail_under),
                }

        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        common = {
            "protocol": s.protocol,
            "protocol_version": PROTOCOL_VERSION,
            "ipc": ipc,
            "dataset": ds.name,
            "synthetic": str(file),
            "timestamp": stamp,
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
                    entries.append(
                        {
                            **_summary(rows),
                            "source": source,
                            "model": m,
                            **common,
                            "iteration": 0 if source == "init" else None,
                        }
                    )
        warnings = _below_baselines(entries)
        evaluation.append(out_file, entries)
        partial.unlink(missing_ok=True)
    sink.emit(EvalDone(entries))
    return {
        "target": str(target),
        "eval_file": str(out_file),
        "results": entries,
        "warnings": warnings,
        **verdict(entries, s.fail_under),
    }


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
    by_it: dict = {}
    for o in rows:
        by_it.setdefault(o["iteration"], []).append(o)
    per = {it: _summary(group) for it, group in sorted(by_it.items(), key=lambda kv: -1 if kv[0] is None else kv[0])}
    final_it = max(per, key=lambda it: -1 if it is None else it)
    if select == "val":
        chosen = max(per, key=lambda it: (per[it]["val_accuracy"], it))  # ties: the later checkpoint
    elif select == "test-max":
        chosen = max(per, key=lambda it: (per[it]["mean"], it))
    else:
        chosen = final_it
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
        entry["checkpoints"] = [
            {
                "iteration": it,
                "mean": v["mean"],
                "std": v["std"],
                "val_accuracy": v["val_accuracy"],
                "accuracies": v["accuracies"],
                "lr": v["lr"],
            }
            for it, v in per.items()
        ]
    return entry


def _below_baselines(entries: list[dict]) -> list[str]:
    """Warnings for a distilled set below the init or random baseline by more than the larger of the two spreads."""
    notes = []
    for d in (e for e in entries if e["source"] == "distilled"):
        for b in (e for e in entries if e["source"] in ("init", "random") and e["model"] == d["model"]):
            gap = b["mean"] - d["mean"]
            if gap > max(d["std"], b["std"]):
                what = "its own initial images" if b["source"] == "init" else "random real images"
                notes.append(
                    f"The distilled set ({d['model']}) scores {100 * d['mean']:.2f}%, {100 * gap:.2f} points below {what} "
                    f"({100 * b['mean']:.2f}%) trained the same way: distillation made these images worse. Check the "
                    "learning rates (--lr-img, --lr-teacher) and the experts' accuracy."
                )
                d.setdefault("below_baselines", []).append(b["source"])
    return notes


# Settings that only choose which trainings run (or where): a finished training is reused across them.
_NOT_IN_JOB_KEY = {
    "device",
    "threads",
    "fail_under",
    "data_dir",
    "models",
    "runs",
    "baseline",
    "distilled",
    "select",
    "dist_timeout",
    "host_memory",
    "deterministic",
}


def _fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _job_key(s: EvalSettings, fingerprint: str, src: str, model: str, run: int) -> str:
    """Identifies one training: the synthetic set, every setting that changes its result, the loop's
    version (so a rerun never reuses a training made by an older loop) and (source, model, run)."""
    data = {
        "settings": s.model_dump(mode="json", exclude=_NOT_IN_JOB_KEY & set(type(s).model_fields)),
        "synthetic": fingerprint,
        "protocol_version": PROTOCOL_VERSION,
        "job": [src, model, run],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
