"""``dpd experts``: train expert trajectories on real data.

The folder's files (manifest, preprocessing, one trajectory per expert) and their reader
``ExpertSet`` live in ``dpd_cli.artifacts.experts``.
Trajectory rows are copies taken with ``FlatModel.flatten`` (never views of live parameters).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from dpd_cli import interrupt
from dpd_cli.artifacts import experts as experts_file
from dpd_cli.artifacts import preprocess as preprocess_file
from dpd_cli.artifacts.experts import MANIFEST, PREPROCESS, expert_path
from dpd_cli.config.settings import ExpertSettings
from dpd_cli.core import parallel
from dpd_cli.core.train import accuracy, fresh, sgd, train_epoch
from dpd_cli.data import Preprocess, load_dataset
from dpd_cli.data.preprocess import PREPROCESS_SCHEME
from dpd_cli.errors import ExpertsError, StorageError
from dpd_cli.events import ExpertDone, ExpertEpoch, ExpertSkipped, ExpertsStarted, ExpertStarted, NullSink, Sink
from dpd_cli.io import storage
from dpd_cli.io.provenance import versions
from dpd_cli.models import FlatModel, ModelSpec, build_model
from dpd_cli.recipes.runtime import build_preprocess, dataset_key, derive_seed, model_spec, prepare_runtime
from dpd_cli.text import plural

__all__ = ["run"]

#: ``--concurrent``'s default (on the CPU, on a GPU): on the CPU a batch pays nothing (docs/results.md).
CONCURRENT = (1, 4)


def compat_record(known: dict, spec: ModelSpec) -> dict:
    """An experts folder's ``compat`` record: every ``COMPAT_FIELDS`` entry (``None`` where not ``known``), the
    network and the preprocessing scheme. dpd 0.1 manifests lack val_per_class: None there means no split."""
    compat = {k: known.get(k) for k in experts_file.COMPAT_FIELDS}
    return {**compat, "model": spec.to_dict(), "preprocess_scheme": PREPROCESS_SCHEME}


def differences(found: dict, want: dict) -> list[str]:
    """``key: folder has X, settings say Y`` for every value of ``want`` that the folder records otherwise."""
    return [f"{k}: folder has {found.get(k)!r}, settings say {v!r}" for k, v in want.items() if found.get(k) != v]


def trajectory_meta(s, spec: ModelSpec, layout, training: dict, index: int, pre, settings: dict, **extra) -> dict:
    """An expert file's metadata: the data (``s.dataset``, ``s.zca``), what trained it (``training``: epochs, the
    optimiser's settings, dsa, seed), its place in the folder, ``extra`` (what it learned, or where it came from)."""
    head = {"dataset": s.dataset, "model": spec.to_dict(), "layout": layout, **training, "index": index, "zca": s.zca}
    return {**head, "preprocess_fingerprint": pre.fingerprint(), **extra, "settings": settings, "versions": versions()}


def _check_or_write_manifest(
    folder: Path, compat: dict, s: ExpertSettings, make_pre, validation: dict | None
) -> Preprocess:
    """Refuse a folder whose experts were trained differently; else (re)write the manifest.

    ``make_pre()`` builds the preprocessing; it is called only for a new folder (a ZCA fit takes a while).
    An existing manifest is rewritten only to record this run's ``--num`` (``n_planned``).
    """
    if (folder / MANIFEST).exists():
        previous = experts_file.read_manifest(folder)
        if previous.get("import") is not None:
            raise ExpertsError(
                f"The experts folder {folder} holds experts imported from replay buffers (`dpd experts "
                "import`); trained experts cannot be added to it. Pass another --out."
            )
        found = dict(previous["compat"])
        found["preprocess_scheme"] = experts_file.preprocess_scheme(found)
        if found["preprocess_scheme"] != compat["preprocess_scheme"]:
            raise ExpertsError(experts_file.old_preprocess_message(folder, found))
        diffs = differences(found, compat)
        recorded = (previous.get("validation") or {}).get("fingerprint")
        if validation and recorded and recorded != validation["fingerprint"]:
            diffs.append("the validation split holds other images (the dataset changed)")
        if diffs:
            raise ExpertsError(
                f"The experts folder {folder} holds experts trained with other settings ({'; '.join(diffs)}). "
                "Mixing them would corrupt distillation: use the same settings, or pass another --out."
            )
        if (folder / PREPROCESS).exists():
            pre = experts_file.load_preprocess(folder, ModelSpec.from_dict(compat["model"]))
            if previous.get("n_planned") != s.num:
                experts_file.write_manifest(folder, {**previous, "n_planned": s.num})
            return pre
    pre = make_pre()
    preprocess_file.save(folder / PREPROCESS, pre)
    manifest = experts_file.new_manifest(compat, s.model_dump(mode="json"), pre, validation, n_planned=s.num)
    experts_file.write_manifest(folder, manifest)
    return pre


def _finished(path: Path) -> bool:
    try:
        storage.read_header(path)
        return True
    except StorageError:
        return False


def run(settings: ExpertSettings, sink: Sink | None = None) -> Path:
    """Train ``settings.num`` experts (this process's torchrun shard), skipping finished ones; returns the folder."""
    s, sink = settings, sink or NullSink()
    device = prepare_runtime(s.threads, s.device, s.deterministic)
    ds = load_dataset(s.dataset, s.data_dir, s.train_per_class, s.seed, s.val_per_class)
    spec = model_spec(s, ds)
    folder = Path(s.out or experts_file.default_folder(dataset_key(s), spec.tag(), s.zca))
    compat = compat_record({**s.model_dump(), "dataset": dataset_key(s)}, spec)
    # Each rank trains its share; under torchrun the process group exists from the start (with its timeout),
    # while a scheduler's job array (RANK and WORLD_SIZE alone) runs its ranks independently.
    group = parallel.start(device, s.dist_timeout, required=False)
    rank, world = parallel.world_from_env()
    sink = sink if rank == 0 else NullSink()

    # Under torchrun the ranks share the folder and each locks its own rank; a plain run is kept out.
    with contextlib.ExitStack() as stack:
        stack.callback(parallel.stop)
        stack.enter_context(storage.lock_shard(folder, "experts", rank, world))
        stack.enter_context(interrupt.safe_points())
        mine = list(range(rank, s.num, world))  # this rank's experts
        # Temp files of a killed process (only this rank's own files when torchrun shares the folder).
        storage.remove_stale_temps(folder, None if world == 1 else [expert_path(folder, i).name for i in mine])
        make_pre, validation = (lambda: build_preprocess(ds, s.zca)), experts_file.validation_record(ds)
        if rank == 0:  # writes the manifest and the preprocessing (a ZCA fit) once; the others then read them
            pre = _check_or_write_manifest(folder, compat, s, make_pre, validation)
        if group is not None:
            group.barrier()
        if rank != 0:
            pre = _check_or_write_manifest(folder, compat, s, make_pre, validation)
        x_train, y_train = pre.apply(ds.train_images).to(device), ds.train_labels.to(device)
        x_test, y_test = pre.apply(ds.test_images).to(device), ds.test_labels.to(device)

        todo = [i for i in mine if not _finished(expert_path(folder, i))]
        for i in sorted(set(mine) - set(todo)):
            sink.emit(ExpertSkipped(i, str(expert_path(folder, i))))
        n_params = FlatModel(build_model(spec)).n_params
        sink.emit(ExpertsStarted(str(folder), todo, s.num, s.epochs, n_params, str(device)))
        k = s.concurrent or CONCURRENT[device.type == "cuda"]
        for n in range(0, len(todo), k):
            group = todo[n : n + k]
            try:
                _train_group(group, s, spec, pre, folder, x_train, y_train, x_test, y_test, device, sink)
            except interrupt.Interrupted:
                kept = len(mine) - len(todo) + n
                which = f"expert {group[0]}" if len(group) == 1 else f"experts {', '.join(map(str, group))}"
                raise interrupt.Interrupted(
                    f"stopped while training {which}; kept {plural(kept, 'finished expert')} in {folder}. "
                    "Rerun the same command to train the rest (finished experts are skipped)"
                ) from None
    return folder


def _train_group(indices, s: ExpertSettings, spec, pre, folder, x_train, y_train, x_test, y_test, device, sink) -> None:
    """Train experts ``indices`` together (a ``Stack`` when several) and save each: each with its own seeded
    initialisation, shuffles and DSA draws, so each file is the one it would be alone, up to rounding."""
    seeds = [derive_seed(s.seed, "expert", i) for i in indices]
    k, n = len(seeds), len(y_train)
    net, x, y, gen, rng = fresh(spec, seeds, device, x_train, y_train)
    flat = FlatModel(net if k == 1 else net.base)  # a Stack's base: the layout (its parameters live on "meta")
    opt = sgd(net, [s.lr] * k, s.momentum, s.weight_decay)
    sink.emit(ExpertStarted(indices[0], k))
    # (K, E+1, P), filled row by row: the only copy of the trajectories in memory, each saved without another.
    trajectories = torch.empty(k, s.epochs + 1, flat.n_params, dtype=torch.float32)

    def record(epoch: int) -> list[float]:  # the parameters after ``epoch`` (copies, not views), the test accuracies
        trajectories[:, epoch].copy_(flat.flatten()[None] if k == 1 else net.flatten())
        acc = accuracy(net, x_test, y_test)
        return acc if k > 1 else [acc]

    test_acc, train_loss, train_acc, t_train = [record(0)], [], [], 0.0
    t0 = time.perf_counter()
    for epoch in range(1, s.epochs + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        loss_sum, correct = train_epoch(net, opt, x, y, s.batch, gen, rng, s.dsa)
        loss, acc = [v / n for v in loss_sum.view(-1).tolist()], [v / n for v in correct.view(-1).tolist()]  # syncs
        dt = time.perf_counter() - t
        t_train += dt
        for i, v in zip(indices, loss):
            if not math.isfinite(v):
                raise ExpertsError(f"Expert {i} diverged (loss {v}) at epoch {epoch}. Lower --lr.")
        test_acc.append(record(epoch))
        train_loss.append(loss)
        train_acc.append(acc)
        for j, i in enumerate(indices):  # images/s: of all the experts trained together
            sink.emit(ExpertEpoch(i, epoch, s.epochs, loss[j], acc[j], test_acc[-1][j], k * n / dt))
    training = {f: getattr(s, f) for f in ("epochs", "lr", "momentum", "weight_decay", "batch", "dsa")}
    for j, i in enumerate(indices):
        meta = trajectory_meta(
            s,
            spec,
            flat.layout,
            {**training, "seed": seeds[j]},
            i,
            pre,
            s.model_dump(mode="json"),
            test_accuracy=[a[j] for a in test_acc],
            train_accuracy=[a[j] for a in train_acc],
            train_loss=[v[j] for v in train_loss],
            train_images_per_s=k * n * s.epochs / t_train,
        )
        path = expert_path(folder, i)
        experts_file.save_trajectory(path, trajectories[j], meta)
        sink.emit(ExpertDone(i, str(path), test_acc[-1][j], time.perf_counter() - t0))
