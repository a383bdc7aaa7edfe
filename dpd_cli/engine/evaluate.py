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

import datetime as _dt
import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch

from dpd_cli import interrupt, storage
from dpd_cli.data import Preprocess, load_dataset
from dpd_cli.engine.common import derive_seed, distributed_shard, resolve_device, set_threads, versions
from dpd_cli.engine.distill import SYNTHETIC, load_synthetic
from dpd_cli.engine.train import accuracy, train_epoch
from dpd_cli.errors import DataError, StorageError
from dpd_cli.events import EvalDone, EvalEpoch, EvalRunDone, EvalStarted, Message, NullSink, Sink
from dpd_cli.models import ModelSpec, build_model
from dpd_cli.settings import EvalSettings

__all__ = ["run", "EVAL_FILE", "PROTOCOLS", "PROTOCOL_VERSION", "epochs_run", "random_subset", "load_eval", "eval_path"]

EVAL_FILE = "eval.json"
#: Protocol defaults: E (``--epochs``; E + 1 epochs run, see ``_train``) and lr (None = the learned alpha).
#: Both protocols run the same loop, MTT's ``evaluate_synset``; they differ only in these two values.
PROTOCOLS = {"mtt": {"epochs": 1000, "lr": None}, "fixed": {"epochs": 300, "lr": 0.01}}
#: The training loop's version, part of every job key and eval.json entry. Version 1 (dpd 0.1.0)
#: trained E epochs with ``MultiStepLR`` at E // 2 and kept the momentum; version 2 is MTT's loop.
PROTOCOL_VERSION = 2
_BASELINE_LR = 0.01


def eval_path(target: Path) -> Path:
    """Where results for ``target`` go: ``RUN/eval.json``, or ``<file>.eval.json`` for a bare file."""
    target = Path(target)
    return target / EVAL_FILE if target.is_dir() else target.with_name(target.stem + ".eval.json")


def load_eval(path: Path) -> dict:
    """Read an eval.json, validated; a missing file is an empty result list."""
    if not Path(path).exists():
        return {"format": "dpd.eval", "format_version": 1, "results": []}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != "dpd.eval" or not isinstance(data.get("results"), list):
            raise ValueError("not a dpd.eval file")
    except (OSError, ValueError, AttributeError) as e:
        raise StorageError(f"{path} is not a readable dpd evaluation file ({e}). Move it aside and rerun.") from e
    return data


def random_subset(labels: torch.Tensor, n_classes: int, per_class: int, seed: int) -> torch.Tensor:
    """Indices of a seeded, class-balanced random subset (``per_class`` of each class)."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(n_classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < per_class:
            raise DataError(f"The random baseline needs {per_class} images of class {c}, the training set has {len(idx)}.")
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks)


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
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # kept on the device: no sync per epoch
    for epoch in range(1, n_epochs + 1):
        interrupt.check("evaluation stopped")  # run() re-raises with what was kept
        loss_sum, _ = train_epoch(net, opt, x, y, s.batch, gen, rng, s.dsa)
        if epoch == decay_after:
            opt = _sgd(net, lr * 0.1, s)  # a fresh optimiser: zero momentum, as MTT
        first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss_sum), epoch, first_bad)
        on_epoch(epoch, loss_sum)
    diverged = int(first_bad.item())
    return net, (diverged or None)


def _train_and_test(spec, x, y, x_test, y_test, epochs, lr, s: EvalSettings, seed, device, on_epoch) -> tuple[float, int | None]:
    """Train one fresh network (``_train``) and test it once, after its last epoch.

    Returns:
        ``(test accuracy, first epoch whose loss was NaN/Inf or None)``; a diverged network still
        counts at the accuracy it ends with (no run is ever dropped from a mean).
    """
    net, diverged = _train(spec, x, y, epochs, lr, s, seed, device, on_epoch)
    return accuracy(net, x_test, y_test), diverged


def run(settings: EvalSettings, target: Path, sink: Sink | None = None) -> dict:
    """Evaluate the synthetic set in ``target`` (a run dir, synthetic.safetensors or a checkpoint).

    Returns:
        ``{"target", "eval_file", "results": [entry, ...]}``; entries as stored in eval.json.

    Raises:
        UserError: Unreadable synthetic set, dataset problems, bad device.
    """
    s = settings
    sink = sink or NullSink()
    if not str(target).strip():
        raise StorageError("The target is empty. Give a run directory (from `dpd distill`) or a synthetic.safetensors file.")
    target = Path(target)
    if not target.exists():
        raise StorageError(f"{target} does not exist. Give a run directory (from `dpd distill`) or a synthetic.safetensors file.")
    file = target / SYNTHETIC if target.is_dir() else target
    if target.is_dir() and not file.exists():
        raise StorageError(f"{target} has no {SYNTHETIC}: it is not a finished or checkpointed run. Run `dpd distill --out {target}` (or --resume) first.")
    tensors, meta = load_synthetic(file)
    set_threads(s.threads)
    device = resolve_device(s.device)
    run_settings = meta.get("settings", {})
    data_dir = s.data_dir or run_settings.get("data_dir")
    ds = load_dataset(meta["dataset"], Path(data_dir) if data_dir else None)
    pre = Preprocess.from_tensors(tensors)
    base_spec = ModelSpec.from_dict(meta["model"])
    if ds.n_classes != base_spec.n_classes or tuple(ds.image_shape) != tuple(tensors["images"].shape[1:]):
        raise DataError(
            f"The synthetic set ({tuple(tensors['images'].shape[1:])} images, {base_spec.n_classes} classes) does not fit "
            f"dataset {ds.name} ({ds.image_shape}, {ds.n_classes} classes). Check --data-dir."
        )
    if list(meta["classes"]) != list(ds.classes):
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(meta["classes"], ds.classes)) if a != b]
        raise DataError(
            f"The synthetic set's classes differ from those of dataset {ds.name} (label {'; '.join(diff[:3])}"
            f"{'; ...' if len(diff) > 3 else ''}): its labels would be scored against the wrong classes. Check --data-dir."
        )
    x_test = pre.apply(ds.test_images).to(device)
    y_test = ds.test_labels.to(device)

    protocol = PROTOCOLS[s.protocol]
    epochs = s.epochs or protocol["epochs"]
    learned_lr = float(tensors["lr"])
    ipc = int(meta.get("ipc") or len(tensors["labels"]) // base_spec.n_classes)
    sources = (["distilled"] if s.distilled else []) + list(s.baseline)
    jobs = [(src, m, r) for src in sources for m in s.models for r in range(s.runs)]
    rank, world = distributed_shard()
    mine = jobs[rank::world]
    sink.emit(EvalStarted(mine, epochs_run(epochs)[0], str(device)))  # epochs that run: E + 1

    data_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def data_for(src: str, r: int):
        if src == "distilled":
            return tensors["images"].to(device), tensors["labels"].to(device)
        if src == "random":
            idx = random_subset(ds.train_labels, ds.n_classes, ipc, derive_seed(s.seed, "random-subset", r))
            return pre.apply(ds.train_images[idx]).to(device), ds.train_labels[idx].to(device)
        if "full" not in data_cache:
            data_cache["full"] = (pre.apply(ds.train_images).to(device), ds.train_labels.to(device))
        return data_cache["full"]

    def lr_for(src: str) -> float:
        if s.lr is not None:
            return s.lr
        if src == "distilled":
            return protocol["lr"] if protocol["lr"] is not None else learned_lr
        return protocol["lr"] if protocol["lr"] is not None else _BASELINE_LR

    out_file = eval_path(target)
    partial = out_file.with_suffix(".partial.jsonl")  # finished trainings of an interrupted evaluation
    fingerprint = _fingerprint(tensors)
    keys = {job: _job_key(s, fingerprint, *job) for job in mine}
    lock = f".{out_file.name}.lock" if world == 1 else f".{out_file.name}.rank{rank}.lock"
    with storage.lock_dir(out_file.parent, f"an evaluation of {file}", lock, "Wait for it to finish."), interrupt.safe_points():
        done = _load_partial(partial, {k: job for job, k in keys.items()})
        if done:
            sink.emit(Message(f"Reusing {len(done)} finished training(s) from {partial}."))
        outcomes = []
        for src, m, r in mine:
            if (src, m, r) in done:
                outcomes.append(done[(src, m, r)])
                continue
            spec = ModelSpec(m, base_spec.channels, base_spec.image_size, base_spec.n_classes,
                             base_spec.width, base_spec.depth, base_spec.norm, base_spec.pool)
            n_epochs = s.full_epochs if src == "full" else epochs
            seed = derive_seed(s.seed, src, m, r)
            x, y = data_for(src, r)
            t0 = time.perf_counter()

            def on_epoch(epoch, loss_sum, src=src, m=m, r=r, n=len(y), total=epochs_run(n_epochs)[0]):
                if epoch == total or epoch % max(1, total // 50) == 0:
                    sink.emit(EvalEpoch(src, m, r, epoch, total, float(loss_sum) / n))

            try:
                acc, diverged = _train_and_test(spec, x, y, x_test, y_test, n_epochs, lr_for(src), s, seed, device, on_epoch)
            except interrupt.Interrupted:
                kept = f"{len(outcomes)} finished training(s) are kept in {partial}" if outcomes else "no training had finished"
                raise interrupt.Interrupted(f"evaluation stopped; {kept}. Rerun the same command to continue") from None
            dt = time.perf_counter() - t0
            outcome = {"source": src, "model": m, "run": r, "accuracy": acc, "seed": seed, "seconds": dt,
                       "epochs": n_epochs, "lr": lr_for(src), "diverged_epoch": diverged}
            _append_partial(partial, keys[(src, m, r)], outcome)
            outcomes.append(outcome)
            sink.emit(EvalRunDone(src, m, r, acc, dt, diverged))

        if world > 1:
            outcomes = _gather(outcomes)
            if rank != 0:
                return {"target": str(target), "eval_file": None, "results": []}

        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        entries = []
        for src in sources:
            for m in s.models:
                rows = sorted((o for o in outcomes if o["source"] == src and o["model"] == m), key=lambda o: o["run"])
                accs = [o["accuracy"] for o in rows]
                mean = sum(accs) / len(accs)
                std = math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))  # population std, as MTT reports
                entries.append({
                    "source": src, "model": m, "protocol": s.protocol, "protocol_version": PROTOCOL_VERSION,
                    "epochs": rows[0]["epochs"], "lr": rows[0]["lr"],
                    "runs": len(accs), "accuracies": accs, "mean": mean, "std": std, "seeds": [o["seed"] for o in rows],
                    "diverged_runs": [o["run"] for o in rows if o.get("diverged_epoch")],
                    "seconds_per_run": sum(o["seconds"] for o in rows) / len(rows),
                    "ipc": ipc, "dataset": ds.name, "iteration": meta.get("iteration"), "synthetic": str(file),
                    "timestamp": stamp, "settings": s.model_dump(mode="json"), "versions": versions(),
                })
        record = load_eval(out_file)
        record["results"].extend(entries)
        storage.atomic_write_text(out_file, json.dumps(record, indent=2))
        partial.unlink(missing_ok=True)
    sink.emit(EvalDone(entries))
    return {"target": str(target), "eval_file": str(out_file), "results": entries}


# Settings that only choose which trainings run (or where): a finished training is reused across them.
_NOT_IN_JOB_KEY = {"device", "threads", "fail_under", "data_dir", "models", "runs", "baseline", "distilled"}


def _fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _job_key(s: EvalSettings, fingerprint: str, src: str, model: str, run: int) -> str:
    """Identifies one training: the synthetic set, every setting that changes its result, the loop's
    version (so a rerun never reuses a training made by an older loop) and (source, model, run)."""
    data = {"settings": s.model_dump(mode="json", exclude=_NOT_IN_JOB_KEY & set(type(s).model_fields)),
            "synthetic": fingerprint, "protocol_version": PROTOCOL_VERSION, "job": [src, model, run]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _load_partial(path: Path, wanted: dict[str, tuple]) -> dict[tuple, dict]:
    """Finished trainings recorded in ``path`` whose key is wanted; torn or foreign lines are skipped."""
    done: dict[tuple, dict] = {}
    if not path.exists():
        return done
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return done
    for line in lines:
        try:
            rec = json.loads(line)
            job = wanted.get(rec["key"])
            o = rec["outcome"]
            if job is not None and [o["source"], o["model"], o["run"]] == list(job) and isinstance(o["accuracy"], float):
                done[job] = o
        except (ValueError, KeyError, TypeError):
            continue
    return done


def _append_partial(path: Path, key: str, outcome: dict) -> None:
    storage.append_text(path, json.dumps({"key": key, "outcome": outcome}) + "\n", sync=True)


def _gather(outcomes: list[dict]) -> list[dict]:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, outcomes)
    return [o for part in gathered for o in part]
