"""``dpd experts``: train expert trajectories on real data, and read them back.

Folder layout (``<experts root>/<dataset>/<model tag>[-zca]/`` by default)::

    experts.json                  manifest: what every expert here was trained with
    preprocess.safetensors        the normalisation / ZCA tensors all experts saw
    expert_00000.safetensors      trajectory (E+1, P) float32 + metadata, one per expert

A trajectory row ``e`` holds the flat parameters after ``e`` epochs (row 0 = initialisation);
rows are copies taken with ``FlatModel.flatten`` (never views of live parameters).
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path

import torch

from dpd_cli import interrupt, paths, storage
from dpd_cli.artifacts import preprocess as preprocess_file
from dpd_cli.data import Preprocess, load_dataset
from dpd_cli.data.preprocess import PREPROCESS_SCHEME
from dpd_cli.engine import parallel
from dpd_cli.engine.common import (
    build_preprocess,
    dataset_key,
    derive_seed,
    model_spec,
    resolve_device,
    set_threads,
    spec_from_meta,
    versions,
)
from dpd_cli.engine.train import accuracy, train_epoch
from dpd_cli.errors import ExpertsError, StorageError
from dpd_cli.events import ExpertDone, ExpertEpoch, ExpertsStarted, ExpertSkipped, ExpertStarted, NullSink, Sink
from dpd_cli.models import FlatModel, ModelSpec, build_model
from dpd_cli.settings import ExpertSettings

__all__ = ["run", "default_folder", "ExpertSet", "expert_path", "MANIFEST", "PREPROCESS", "TRAJECTORY", "new_manifest",
           "write_manifest", "read_manifest", "load_preprocess", "preprocess_scheme"]

MANIFEST = "experts.json"
_MANIFEST_VERSION = 1
PREPROCESS = "preprocess.safetensors"
TRAJECTORY = "dpd.trajectory"

# Settings that must agree for experts to share one folder.
_COMPAT_FIELDS = ("dataset", "train_per_class", "val_per_class", "zca", "epochs", "lr", "momentum", "weight_decay", "batch", "dsa", "seed")


def default_folder(dataset: str, spec_tag: str, zca: bool) -> Path:
    return paths.experts_root() / dataset / (spec_tag + ("-zca" if zca else ""))


def expert_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"expert_{index:05d}.safetensors"


def _compat(settings: ExpertSettings, spec: ModelSpec) -> dict:
    # dpd 0.1 manifests lack val_per_class: None there means the same as here (no split).
    d = {k: getattr(settings, k) for k in _COMPAT_FIELDS}
    d["dataset"] = dataset_key(settings)
    d["model"] = spec.to_dict()
    d["preprocess_scheme"] = PREPROCESS_SCHEME
    return d


def preprocess_scheme(compat: dict) -> int:
    """The preprocessing recipe (``dpd_cli.data.preprocess.PREPROCESS_SCHEME``) a folder's experts saw.

    Folders written by dpd 0.1 lack the entry: their preprocessing differs from today's only with
    ZCA (fitted on normalised pixels then) and for CIFAR-100 (normalised with its own statistics).
    """
    scheme = compat.get("preprocess_scheme")
    if scheme is not None:
        return scheme
    return 1 if compat.get("zca") or compat.get("dataset") == "cifar100" else PREPROCESS_SCHEME


def validation_record(ds) -> dict | None:
    """Which training images a dataset's validation split holds (for manifests and run settings)."""
    if ds.val_indices is None:
        return None
    per_class = len(ds.val_indices) // ds.n_classes
    return {"per_class": per_class, "fingerprint": ds.val_fingerprint, "indices": ds.val_indices.tolist()}


def old_preprocess_message(folder: Path, compat: dict) -> str:
    """Why experts trained with dpd 0.1's preprocessing cannot be mixed with today's, and what to do."""
    what = ("ZCA fitted on mean/std-normalised pixels" if compat.get("zca")
            else "CIFAR-100 normalised with its own statistics")
    return (
        f"The experts in {folder} were trained with dpd 0.1's preprocessing ({what}). This dpd preprocesses as "
        "MTT does (ZCA fitted on the raw [0, 1] pixels with no normalisation; CIFAR-100 normalised with CIFAR-10's "
        "constants), and experts, synthetic images and test images must share one preprocessing. Train new experts "
        "with `dpd experts` into another folder (--out, or delete this one), or keep using dpd 0.1 for it. "
        "Synthetic sets already distilled from these experts still evaluate correctly: each file carries its own preprocessing."
    )


def _check_or_write_manifest(folder: Path, compat: dict, settings: ExpertSettings, make_pre, validation: dict | None) -> Preprocess:
    """Refuse a folder whose experts were trained differently; else (re)write the manifest.

    ``make_pre()`` builds the preprocessing; it is called only for a new folder (a ZCA fit takes a while).
    """
    mpath = folder / MANIFEST
    if mpath.exists():
        if _read_manifest(mpath).get("import") is not None:
            raise ExpertsError(f"The experts folder {folder} holds experts imported from replay buffers (`dpd experts "
                               "import`); trained experts cannot be added to it. Pass another --out.")
        found = dict(_read_manifest(mpath)["compat"])
        found["preprocess_scheme"] = preprocess_scheme(found)
        if found["preprocess_scheme"] != compat["preprocess_scheme"]:
            raise ExpertsError(old_preprocess_message(folder, found))
        diffs = [f"{k}: folder has {found.get(k)!r}, settings say {v!r}" for k, v in compat.items() if found.get(k) != v]
        recorded = (_read_manifest(mpath).get("validation") or {}).get("fingerprint")
        if validation and recorded and recorded != validation["fingerprint"]:
            diffs.append("the validation split holds other images (the dataset changed)")
        if diffs:
            raise ExpertsError(
                f"The experts folder {folder} holds experts trained with other settings ({'; '.join(diffs)}). "
                "Mixing them would corrupt distillation: use the same settings, or pass another --out."
            )
        if (folder / PREPROCESS).exists():
            return _load_preprocess(folder / PREPROCESS, ModelSpec.from_dict(compat["model"]))
    pre = make_pre()
    preprocess_file.save(folder / PREPROCESS, pre)
    write_manifest(folder, new_manifest(compat, settings.model_dump(mode="json"), pre, validation))
    return pre


def new_manifest(compat: dict, settings: dict, pre: Preprocess, validation: dict | None, **extra) -> dict:
    """The ``experts.json`` of a folder (docs/formats.md): ``extra`` adds entries, such as ``import``."""
    return {
        "format": "dpd.experts",
        "format_version": _MANIFEST_VERSION,
        "compat": compat,
        "settings": settings,
        "preprocess_fingerprint": pre.fingerprint(),
        "validation": validation,
        "versions": versions(),
        **extra,
    }


def write_manifest(folder: Path, manifest: dict) -> None:
    storage.atomic_write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(folder: Path) -> dict:
    """``experts.json`` of ``folder``, checked (see ``_read_manifest``)."""
    return _read_manifest(Path(folder) / MANIFEST)


def load_preprocess(folder: Path, spec: ModelSpec) -> Preprocess:
    """``preprocess.safetensors`` of ``folder``, checked against the image shape of ``spec``."""
    return _load_preprocess(Path(folder) / PREPROCESS, spec)


def _read_manifest(mpath: Path) -> dict:
    """``experts.json``, checked: a dpd experts manifest of the version this dpd reads."""
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise StorageError(f"{mpath} is missing or unreadable ({e}); {mpath.parent} is not a complete experts folder. "
                           "Rerun `dpd experts` with --out pointing at it (finished experts are kept), or choose another folder.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "dpd.experts" or not isinstance(manifest.get("compat"), dict):
        raise StorageError(f"{mpath} is not a dpd experts manifest. Remove it and rerun `dpd experts`, or choose another folder.")
    if manifest.get("format_version") != _MANIFEST_VERSION:
        raise StorageError(
            f"{mpath} is dpd.experts format version {manifest.get('format_version')!r}; this dpd reads version {_MANIFEST_VERSION}. "
            "Use the dpd version that wrote it, or train the experts again into another folder."
        )
    return manifest


def _load_preprocess(path: Path, spec: ModelSpec) -> Preprocess:
    """The folder's normalisation/ZCA tensors, checked against the image shape of ``spec``."""
    if not path.exists():
        raise StorageError(f"{path} is missing; {path.parent} is not a complete experts folder. "
                           "Rerun `dpd experts` with --out pointing at it (finished experts are kept).")
    return preprocess_file.load(path, spec.channels, spec.image_size, "Delete the file and rerun `dpd experts`.")


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
    ds = load_dataset(settings.dataset, settings.data_dir, settings.train_per_class, settings.seed, settings.val_per_class)
    spec = model_spec(settings, ds)
    folder = Path(settings.out) if settings.out else default_folder(dataset_key(settings), spec.tag(), settings.zca)
    compat = _compat(settings, spec)
    # Each rank trains its share; under torchrun the process group exists from the start (with its timeout),
    # while a scheduler's job array (RANK and WORLD_SIZE alone) runs its ranks independently.
    group = parallel.start(device, settings.dist_timeout, required=False)
    rank, world = parallel.world_from_env()
    if rank != 0:
        sink = NullSink()

    # Under torchrun the ranks share the folder and each locks its own rank; a plain run is kept out.
    with contextlib.ExitStack() as stack:
        stack.callback(parallel.stop)
        stack.enter_context(storage.lock_shard(folder, "experts", rank, world))
        stack.enter_context(interrupt.safe_points())
        # Temp files of a killed process (only this rank's own files when torchrun shares the folder).
        storage.remove_stale_temps(folder, None if world == 1 else [expert_path(folder, i).name for i in range(rank, settings.num, world)])
        make_pre, validation = (lambda: build_preprocess(ds, settings.zca)), validation_record(ds)
        if rank == 0:  # writes the manifest and the preprocessing (a ZCA fit) once; the others then read them
            pre = _check_or_write_manifest(folder, compat, settings, make_pre, validation)
        if group is not None:
            group.barrier()
        if rank != 0:
            pre = _check_or_write_manifest(folder, compat, settings, make_pre, validation)
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
        for n, i in enumerate(todo):
            try:
                _train_one(i, settings, spec, pre, folder, x_train, y_train, x_test, y_test, device, sink)
            except interrupt.Interrupted:
                kept = len(mine) - len(todo) + n
                raise interrupt.Interrupted(
                    f"stopped while training expert {i}; the {kept} finished expert(s) in {folder} are kept. "
                    "Rerun the same command to train the rest (finished experts are skipped)"
                ) from None
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
    # (E+1, P), filled row by row: the only copy of the trajectory in memory, saved without another.
    trajectory = torch.empty(settings.epochs + 1, flat.n_params, dtype=torch.float32)
    trajectory[0].copy_(flat.flatten())
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
        trajectory[epoch].copy_(flat.flatten())  # a copy, not a view of the live parameters
        test_acc.append(accuracy(net, x_test, y_test))
        train_loss.append(loss)
        train_acc.append(acc)
        sink.emit(ExpertEpoch(i, epoch, settings.epochs, loss, acc, test_acc[-1], len(y_train) / dt))
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

    Every expert file stays open (memory-mapped) until ``close()``, or the end of a ``with`` block.

    Example:
        >>> with ExpertSet(folder) as experts:
        ...     start, target = experts.pair(3, t=5, m=2)   # reads rows 5 and 7 of expert 3 only
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
        self.manifest = _read_manifest(mpath)
        self.compat = self.manifest["compat"]
        self.preprocess_scheme = preprocess_scheme(self.compat)
        self.files: list[storage.TensorFile] = []
        try:
            for f in files:
                self.files.append(storage.TensorFile(f, TRAJECTORY))
            self._check()
        except BaseException:
            self.close()  # a refused folder leaves nothing open
            raise

    def _check(self) -> None:
        """Every file holds a trajectory of the same model and length, and the normalisation matches."""
        first = self.files[0]
        self.meta = first.meta
        self.spec = spec_from_meta(first.path, self.meta.get("model"))
        self.layout = self.meta.get("layout")
        self.epochs = self.meta.get("epochs")
        if not (isinstance(self.layout, list) and self.layout and all(_is_layer(x) for x in self.layout)):
            raise StorageError(f"{first.path}: the metadata entry 'layout' is missing or malformed. Delete that file and rerun `dpd experts`.")
        if type(self.epochs) is not int or self.epochs < 1:
            raise StorageError(f"{first.path}: the metadata entry 'epochs' is missing or malformed. Delete that file and rerun `dpd experts`.")
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
        self.preprocess = _load_preprocess(self.folder / PREPROCESS, self.spec)
        recorded = self.meta.get("preprocess_fingerprint")
        if recorded is not None and recorded != self.preprocess.fingerprint():
            raise StorageError(
                f"{self.folder / PREPROCESS} is not the normalisation the experts were trained with (fingerprint "
                f"{self.preprocess.fingerprint()}, experts recorded {recorded}). Restore it, or train the experts again."
            )

    def __len__(self) -> int:
        return len(self.files)

    def close(self) -> None:
        """Release every expert file; closing twice is fine."""
        for f in self.files:
            f.close()

    def __enter__(self) -> "ExpertSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pair(self, index: int, t: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``t`` and ``t + m`` of expert ``index`` (CPU float32), checked finite."""
        rows = self.files[index].rows("trajectory", [t, t + m])
        if not torch.isfinite(rows).all():
            raise StorageError(f"{self.files[index].path} holds NaN or Inf parameters at epoch {t} or {t + m}. Delete it and rerun `dpd experts`.")
        return rows[0], rows[1]


def _is_layer(entry) -> bool:
    """``[name, [d0, d1, ...]]`` as ``FlatModel.layout`` writes it."""
    return (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)
            and all(type(d) is int and 0 < d <= 1 << 24 for d in entry[1]))


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
            with storage.TensorFile(f, TRAJECTORY) as tf:
                acc = tf.meta.get("test_accuracy") or [float("nan")]
                out["experts"].append({
                    "file": f.name,
                    "index": tf.meta.get("index"),
                    "epochs": tf.meta.get("epochs"),
                    "final_test_accuracy": acc[-1],
                    "train_images_per_s": tf.meta.get("train_images_per_s"),
                })
        except StorageError as e:
            out.setdefault("invalid", []).append({"file": f.name, "error": str(e)})
    return out
