"""``dpd experts``: train expert trajectories on real data, and read them back.

Folder layout (``<experts root>/<dataset>/<model tag>[-zca]/`` by default)::

    experts.json                  manifest: what every expert here was trained with
    preprocess.safetensors        the normalisation / ZCA tensors all experts saw
    expert_00000.safetensors      trajectory (E+1, P) float32 + metadata, one per expert

A trajectory row ``e`` holds the flat parameters after ``e`` epochs (row 0 = initialisation);
rows are copies taken with ``FlatModel.flatten`` (never views of live parameters).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from dpd_cli import paths, storage
from dpd_cli.data import Preprocess, load_dataset
from dpd_cli.engine.common import (
    build_preprocess,
    dataset_key,
    derive_seed,
    distributed_shard,
    model_spec,
    resolve_device,
    set_threads,
    versions,
)
from dpd_cli.engine.train import accuracy, train_epoch
from dpd_cli.errors import ExpertsError, StorageError
from dpd_cli.events import ExpertDone, ExpertEpoch, ExpertsStarted, ExpertSkipped, ExpertStarted, NullSink, Sink
from dpd_cli.models import FlatModel, ModelSpec, build_model
from dpd_cli.settings import ExpertSettings

__all__ = ["run", "default_folder", "ExpertSet", "expert_path", "MANIFEST"]

MANIFEST = "experts.json"
PREPROCESS = "preprocess.safetensors"
TRAJECTORY = "dpd.trajectory"

# Settings that must agree for experts to share one folder.
_COMPAT_FIELDS = ("dataset", "train_per_class", "zca", "epochs", "lr", "momentum", "weight_decay", "batch", "dsa", "seed")


def default_folder(dataset: str, spec_tag: str, zca: bool) -> Path:
    return paths.experts_root() / dataset / (spec_tag + ("-zca" if zca else ""))


def expert_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"expert_{index:05d}.safetensors"


def _compat(settings: ExpertSettings, spec: ModelSpec) -> dict:
    d = {k: getattr(settings, k) for k in _COMPAT_FIELDS}
    d["dataset"] = dataset_key(settings)
    d["model"] = spec.to_dict()
    return d


def _check_or_write_manifest(folder: Path, compat: dict, settings: ExpertSettings, pre: Preprocess) -> Preprocess:
    """Refuse a folder whose experts were trained differently; else (re)write the manifest."""
    mpath = folder / MANIFEST
    if mpath.exists():
        try:
            found = json.loads(mpath.read_text())["compat"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StorageError(f"{mpath} is unreadable or not a dpd experts manifest ({e}). Remove the folder or choose another --out.") from e
        diffs = [f"{k}: folder has {found.get(k)!r}, settings say {v!r}" for k, v in compat.items() if found.get(k) != v]
        if diffs:
            raise ExpertsError(
                f"The experts folder {folder} holds experts trained with other settings ({'; '.join(diffs)}). "
                "Mixing them would corrupt distillation: use the same settings, or pass another --out."
            )
        if (folder / PREPROCESS).exists():
            t, _ = storage.load_tensors(folder / PREPROCESS, "dpd.preprocess")
            return Preprocess.from_tensors(t)
    storage.save_tensors(folder / PREPROCESS, pre.tensors(), "dpd.preprocess", {"fingerprint": pre.fingerprint()})
    manifest = {
        "format": "dpd.experts",
        "format_version": 1,
        "compat": compat,
        "settings": settings.model_dump(mode="json"),
        "preprocess_fingerprint": pre.fingerprint(),
        "versions": versions(),
    }
    storage.atomic_write_text(mpath, json.dumps(manifest, indent=2, sort_keys=True))
    return pre


def _finished(path: Path) -> bool:
    try:
        storage.read_header(path)
        return True
    except StorageError:
        return False


def run(settings: ExpertSettings, sink: Sink | None = None) -> Path:
    """Train ``settings.num`` experts (this process's torchrun shard), skipping finished ones.

    Args:
        settings: Resolved ``dpd experts`` settings.
        sink: Receives progress events.

    Returns:
        The experts folder.

    Raises:
        UserError: Bad dataset, device, or a folder holding incompatible experts.
    """
    sink = sink or NullSink()
    set_threads(settings.threads)
    device = resolve_device(settings.device)
    ds = load_dataset(settings.dataset, settings.data_dir, settings.train_per_class, settings.seed)
    spec = model_spec(settings, ds)
    folder = Path(settings.out) if settings.out else default_folder(dataset_key(settings), spec.tag(), settings.zca)
    rank, world = distributed_shard()
    lock_name = folder if world == 1 else folder / f".rank{rank}"
    compat = _compat(settings, spec)

    with storage.lock_dir(lock_name, "experts"):
        pre = _check_or_write_manifest(folder, compat, settings, build_preprocess(ds, settings.zca))
        x_train = pre.apply(ds.train_images).to(device)
        y_train = ds.train_labels.to(device)
        x_test = pre.apply(ds.test_images).to(device)
        y_test = ds.test_labels.to(device)

        mine = list(range(rank, settings.num, world))
        todo = []
        for i in mine:
            if _finished(expert_path(folder, i)):
                sink.emit(ExpertSkipped(i, str(expert_path(folder, i))))
            else:
                todo.append(i)
        n_params = FlatModel(build_model(spec)).n_params
        sink.emit(ExpertsStarted(str(folder), todo, settings.num, settings.epochs, n_params, str(device)))
        for i in todo:
            _train_one(i, settings, spec, pre, folder, x_train, y_train, x_test, y_test, device, sink)
    return folder


def _train_one(i, settings, spec, pre, folder, x_train, y_train, x_test, y_test, device, sink) -> None:
    seed = derive_seed(settings.seed, "expert", i)
    torch.manual_seed(seed)
    net = build_model(spec).to(device)
    flat = FlatModel(net)
    opt = torch.optim.SGD(net.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    sink.emit(ExpertStarted(i))
    rows = [flat.flatten().cpu()]
    test_acc = [accuracy(net, x_test, y_test)]
    train_loss, train_acc, t_train = [], [], 0.0
    t0 = time.perf_counter()
    for epoch in range(1, settings.epochs + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        loss_sum, correct = train_epoch(net, opt, x_train, y_train, settings.batch, gen, rng, settings.dsa)
        loss, acc = loss_sum.item() / len(y_train), correct.item() / len(y_train)  # syncs: the epoch is done
        dt = time.perf_counter() - t
        t_train += dt
        if not torch.isfinite(torch.tensor(loss)):
            raise ExpertsError(f"Expert {i} diverged (loss {loss}) at epoch {epoch}. Lower --lr.")
        rows.append(flat.flatten().cpu())  # a copy, not a view of the live parameters
        test_acc.append(accuracy(net, x_test, y_test))
        train_loss.append(loss)
        train_acc.append(acc)
        sink.emit(ExpertEpoch(i, epoch, settings.epochs, loss, acc, test_acc[-1], len(y_train) / dt))
    trajectory = torch.stack(rows)  # (E+1, P)
    meta = {
        "dataset": settings.dataset,
        "model": spec.to_dict(),
        "layout": flat.layout,
        "epochs": settings.epochs,
        "lr": settings.lr,
        "momentum": settings.momentum,
        "weight_decay": settings.weight_decay,
        "batch": settings.batch,
        "dsa": settings.dsa,
        "seed": seed,
        "index": i,
        "zca": settings.zca,
        "preprocess_fingerprint": pre.fingerprint(),
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "train_loss": train_loss,
        "train_images_per_s": len(y_train) * settings.epochs / t_train,
        "settings": settings.model_dump(mode="json"),
        "versions": versions(),
    }
    path = expert_path(folder, i)
    storage.save_tensors(path, {"trajectory": trajectory}, TRAJECTORY, meta)
    sink.emit(ExpertDone(i, str(path), test_acc[-1], time.perf_counter() - t0))


class ExpertSet:
    """The experts of one folder, opened for lazy two-row reads.

    Example:
        >>> experts = ExpertSet(folder)
        >>> start, target = experts.pair(3, t=5, m=2)   # reads rows 5 and 7 of expert 3 only
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        mpath = self.folder / MANIFEST
        files = sorted(self.folder.glob("expert_*.safetensors")) if self.folder.is_dir() else []
        if not files:
            raise ExpertsError(
                f"No experts found in {self.folder}. Train them first with `dpd experts` (same --dataset, "
                "--model, --width, --zca), or pass --experts pointing at an experts folder."
            )
        try:
            self.manifest = json.loads(mpath.read_text())
            self.compat = self.manifest["compat"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExpertsError(f"{mpath} is missing or unreadable ({e}); {self.folder} is not a complete experts folder.") from e
        self.files = [storage.TensorFile(f, TRAJECTORY) for f in files]
        first = self.files[0]
        self.meta = first.meta
        self.spec = ModelSpec.from_dict(self.meta["model"])
        self.layout = self.meta["layout"]
        self.epochs = int(self.meta["epochs"])
        n_params = sum(_numel(s) for _, s in self.layout)
        for f in self.files:
            shape = f.shape("trajectory") if "trajectory" in f.header else None
            if f.header.get("trajectory", {}).get("dtype") != "F32" or shape != (self.epochs + 1, n_params):
                raise StorageError(
                    f"{f.path}: trajectory tensor is {f.header.get('trajectory', {}).get('dtype')} {shape}, expected F32 "
                    f"{(self.epochs + 1, n_params)}. Delete that file and rerun `dpd experts`."
                )
            if f.meta.get("model") != self.meta["model"] or f.meta.get("layout") != self.layout:
                raise ExpertsError(f"{f.path} was trained with another model than {first.path}. Keep one model per folder.")
        pre_t, _ = storage.load_tensors(self.folder / PREPROCESS, "dpd.preprocess")
        self.preprocess = Preprocess.from_tensors(pre_t)

    def __len__(self) -> int:
        return len(self.files)

    def pair(self, index: int, t: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``t`` and ``t + m`` of expert ``index`` (CPU float32), checked finite."""
        rows = self.files[index].rows("trajectory", [t, t + m])
        if not torch.isfinite(rows).all():
            raise StorageError(f"{self.files[index].path} holds NaN or Inf parameters at epoch {t} or {t + m}. Delete it and rerun `dpd experts`.")
        return rows[0], rows[1]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def summarize(folder: Path) -> dict:
    """What is in an experts folder, from metadata only (no trajectory is loaded)."""
    folder = Path(folder)
    out: dict = {"folder": str(folder), "experts": []}
    mpath = folder / MANIFEST
    if mpath.exists():
        try:
            out["compat"] = json.loads(mpath.read_text())["compat"]
        except (OSError, ValueError, KeyError, TypeError):
            out["compat"] = None
    for f in sorted(folder.glob("expert_*.safetensors")):
        try:
            header, raw = storage.read_header(f)
            tf = storage.TensorFile(f, TRAJECTORY)
            acc = tf.meta.get("test_accuracy") or [float("nan")]
            out["experts"].append({
                "file": f.name,
                "index": tf.meta.get("index"),
                "epochs": tf.meta.get("epochs"),
                "final_test_accuracy": acc[-1],
                "train_images_per_s": tf.meta.get("train_images_per_s"),
            })
            tf.close()
        except StorageError as e:
            out.setdefault("invalid", []).append({"file": f.name, "error": str(e)})
    return out
