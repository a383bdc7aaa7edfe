"""An experts folder (``dpd experts --out``): its manifest, its preprocessing and one trajectory per expert.

::

    experts.json                  manifest: what every expert here was trained with
    preprocess.safetensors        the normalisation / ZCA tensors all experts saw
    expert_00000.safetensors      trajectory (E+1, P) float32 + metadata, one per expert (row e: after e epochs)
    .lock                         held while ``dpd experts`` writes here

``ExpertSet`` (``dpd distill``) refuses a folder with any damaged, foreign or mismatched expert; ``check``
(``dpd inspect``, ``dpd ls``) lists the same problems from headers only, by the same rules.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dpd_cli.artifacts import json_number, short_message
from dpd_cli.artifacts import preprocess as preprocess_file
from dpd_cli.data import Preprocess
from dpd_cli.data.preprocess import PREPROCESS_SCHEME
from dpd_cli.errors import ExpertsError, StorageError
from dpd_cli.io import paths, storage
from dpd_cli.io.provenance import versions
from dpd_cli.models import ModelSpec
from dpd_cli.models.spec import spec_from_meta

MANIFEST = "experts.json"
MANIFEST_FORMAT = "dpd.experts"
MANIFEST_VERSION = 1
PREPROCESS = "preprocess.safetensors"
TRAJECTORY = "dpd.trajectory"
_GLOB = "expert_*.safetensors"
_REDO = "Delete that file and rerun `dpd experts`."

#: Settings that must agree for experts to share one folder (experts.json's ``compat``, with ``model``
#: and ``preprocess_scheme``).
COMPAT_FIELDS = tuple(
    "dataset train_per_class val_per_class zca epochs lr momentum weight_decay batch dsa seed".split()
)


# --- names ------------------------------------------------------------------------------------
def expert_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"expert_{index:05d}.safetensors"


def expert_files(folder: Path) -> list[Path]:
    """The folder's trajectory files, by index."""
    return sorted(Path(folder).glob(_GLOB))


def is_folder(path: Path) -> bool:
    """Whether ``path`` looks like an experts folder (a manifest or any trajectory file)."""
    path = Path(path)
    return (path / MANIFEST).is_file() or any(path.glob(_GLOB))


def default_folder(dataset: str, spec_tag: str, zca: bool) -> Path:
    """``<experts root>/<dataset>/<model tag>[-zca]``."""
    return paths.experts_root() / dataset / (spec_tag + ("-zca" if zca else ""))


def folders_under(root: Path) -> list[Path]:
    """Every experts folder with a manifest and at least one expert under ``root``, most recently written first."""
    found = [(expert_files(m.parent), m.parent) for m in Path(root).glob(f"**/{MANIFEST}")]
    return [p for _, p in sorted(((max(f.stat().st_mtime for f in fs), p) for fs, p in found if fs), reverse=True)]


# --- manifest ---------------------------------------------------------------------------------
def preprocess_scheme(compat: dict) -> int:
    """The preprocessing recipe (``PREPROCESS_SCHEME``) a folder's experts saw.

    Folders written by dpd 0.1 lack the entry: their preprocessing differs from today's only with
    ZCA (fitted on normalised pixels then) and for CIFAR-100 (normalised with its own statistics).
    """
    if compat.get("preprocess_scheme") is not None:
        return compat["preprocess_scheme"]
    return 1 if compat.get("zca") or compat.get("dataset") == "cifar100" else PREPROCESS_SCHEME


def old_preprocess_message(folder: Path, compat: dict) -> str:
    """Why experts trained with dpd 0.1's preprocessing cannot be mixed with today's, and what to do."""
    what = (
        "ZCA fitted on mean/std-normalised pixels"
        if compat.get("zca")
        else "CIFAR-100 normalised with its own statistics"
    )
    return (
        f"The experts in {folder} were trained with dpd 0.1's preprocessing ({what}). This dpd preprocesses as "
        "MTT does (ZCA fitted on the raw [0, 1] pixels with no normalisation; CIFAR-100 normalised with CIFAR-10's "
        "constants), and experts, synthetic images and test images must share one preprocessing. Train new experts "
        "with `dpd experts` into another folder (--out, or delete this one), or keep using dpd 0.1 for it. "
        "Synthetic sets already distilled from these experts still evaluate correctly: each file carries its own "
        "preprocessing."
    )


def validation_record(ds) -> dict | None:
    """Which training images a dataset's validation split holds (``validation`` in experts.json and settings.json)."""
    if ds.val_indices is None:
        return None
    per_class = len(ds.val_indices) // ds.n_classes
    return {"per_class": per_class, "fingerprint": ds.val_fingerprint, "indices": ds.val_indices.tolist()}


def read_manifest(folder: Path) -> dict:
    """``experts.json`` of ``folder``, checked: a dpd experts manifest of the version this dpd reads."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise StorageError(
            f"{path} is missing or unreadable ({e}); {path.parent} is not a complete experts folder. "
            "Rerun `dpd experts` with --out pointing at it (finished experts are kept), or choose another folder."
        ) from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or not isinstance(manifest.get("compat"), dict)
    ):
        raise StorageError(
            f"{path} is not a dpd experts manifest. Remove it and rerun `dpd experts`, or choose another folder."
        )
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise StorageError(
            f"{path} is dpd.experts format version {manifest.get('format_version')!r}; this dpd reads version "
            f"{MANIFEST_VERSION}. "
            "Use the dpd version that wrote it, or train the experts again into another folder."
        )
    return manifest


def new_manifest(compat: dict, settings: dict, pre: Preprocess, validation: dict | None, **extra) -> dict:
    """The ``experts.json`` of a new folder (docs/formats.md); ``extra`` adds entries (``n_planned``, ...)."""
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "compat": compat,
        "settings": settings,
        "preprocess_fingerprint": pre.fingerprint(),
        "validation": validation,
        "versions": versions(),
        **extra,
    }


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write ``folder/experts.json`` (atomically)."""
    storage.atomic_write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))


def planned_count(manifest: Mapping[str, Any]) -> int | None:
    """How many experts the folder's latest ``dpd experts`` run trains (``--num``; before ``n_planned`` existed,
    the first run's); None if not recorded."""
    n = manifest.get("n_planned")
    if n is None and isinstance(manifest.get("settings"), dict):
        n = manifest["settings"].get("num")
    return n if type(n) is int and n >= 0 else None


# --- trajectory files -------------------------------------------------------------------------
def save_trajectory(path: Path, trajectory: torch.Tensor, meta: Mapping[str, Any]) -> None:
    """Write one expert (atomically): ``trajectory`` (E+1, P) float32; ``meta`` as docs/formats.md lists it."""
    storage.save_tensors(path, {"trajectory": trajectory}, TRAJECTORY, meta)


def _is_layer(entry) -> bool:
    """``[name, [d0, d1, ...]]`` as ``FlatModel.layout`` writes it."""
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
        return False
    return isinstance(entry[0], str) and all(type(d) is int and 0 < d <= 1 << 24 for d in entry[1])


def _trajectory_shape(path: Path, meta: Mapping[str, Any]) -> tuple[int, int]:
    """``(E + 1, P)``: the trajectory shape a file's own metadata (model, layout, epochs) implies, checked."""
    spec_from_meta(path, meta.get("model"))
    layout, epochs = meta.get("layout"), meta.get("epochs")
    if not (isinstance(layout, list) and layout and all(_is_layer(x) for x in layout)):
        raise StorageError(f"{path}: the metadata entry 'layout' is missing or malformed. {_REDO}")
    if type(epochs) is not int or epochs < 1:
        raise StorageError(f"{path}: the metadata entry 'epochs' is missing or malformed. {_REDO}")
    return epochs + 1, sum(math.prod(s) for _, s in layout)


def _check_trajectory(path: Path, header: Mapping[str, Any], shape: tuple[int, int]) -> None:
    """The ``trajectory`` tensor is float32 of ``shape`` (from the header alone)."""
    entry = header.get("trajectory", {})
    found = tuple(entry["shape"]) if "shape" in entry else None
    if entry.get("dtype") != "F32" or found != tuple(shape):
        raise StorageError(
            f"{path}: trajectory tensor is {entry.get('dtype')} {found}, expected F32 {tuple(shape)}. {_REDO}"
        )


def _same_dataset(name, key) -> bool:
    """Whether an expert file's ``dataset`` matches experts.json's: the files store the registry name
    ``imagefolder``, the key tells image folders apart by folder name (``imagefolder-<folder>``)."""
    return name == key or (name == "imagefolder" and isinstance(key, str) and key.startswith("imagefolder-"))


def model_tag(model) -> str | None:
    """A ``model`` metadata entry as its folder-friendly tag (``convnet-w128-d3-instance-avg``), leniently:
    ``None`` for anything but a table, its ``name`` for a table that is not a valid model."""
    if not isinstance(model, dict):
        return None
    try:
        return ModelSpec.from_dict(model).tag()
    except (KeyError, TypeError, ValueError):
        return model.get("name")


def mismatch(
    path: Path, meta: Mapping[str, Any], ref: Mapping[str, Any], ref_name: str, compat: Mapping[str, Any] | None
) -> str | None:
    """Why the expert in ``path`` cannot be matched together with the folder's reference expert (``None``: it can).

    The model, its parameter layout, the epochs and the preprocessing must be the reference's, and
    the dataset the manifest's. Entries a file does not record are not compared.
    """
    problems = []
    if meta.get("model") != ref.get("model"):
        problems.append(f"model {model_tag(meta.get('model'))} differs from {ref_name}'s {model_tag(ref.get('model'))}")
    elif meta.get("layout") != ref.get("layout"):
        problems.append(f"its parameter layout differs from {ref_name}'s")
    if meta.get("epochs") != ref.get("epochs"):
        problems.append(f"{meta.get('epochs')} epochs, {ref_name} has {ref.get('epochs')}")
    if compat and meta.get("dataset") is not None and not _same_dataset(meta.get("dataset"), compat.get("dataset")):
        problems.append(f"dataset {meta.get('dataset')!r}, experts.json says {compat.get('dataset')!r}")
    fp, ref_fp = meta.get("preprocess_fingerprint"), ref.get("preprocess_fingerprint")
    if fp is not None and ref_fp is not None and fp != ref_fp:
        problems.append(f"it saw another normalisation/ZCA than {ref_name}")
    if problems:
        return (
            f"{path}: {'; '.join(problems)}. `dpd distill` refuses mixed folders; keep one kind of expert per folder."
        )
    return None


def _fingerprint_message(ppath: Path, found: str, recorded: str) -> str:
    return f"{ppath} is not the normalisation the experts were trained with (fingerprint {found}, experts recorded {recorded}). Restore it, or train the experts again."


def load_preprocess(folder: Path, spec) -> Preprocess:
    """``preprocess.safetensors`` of ``folder``, checked against the image shape of ``spec``."""
    path = Path(folder) / PREPROCESS
    if not path.exists():
        raise StorageError(
            f"{path} is missing; {path.parent} is not a complete experts folder. Rerun `dpd experts` with --out "
            "pointing at it (finished experts are kept)."
        )
    return preprocess_file.load(path, spec.channels, spec.image_size, "Delete the file and rerun `dpd experts`.")


# --- the strict reader ------------------------------------------------------------------------
class ExpertSet:
    """The experts of one folder, each file open (memory-mapped) for lazy two-row reads until ``close()``.

    Example:
        >>> with ExpertSet(folder) as experts:
        ...     start, target = experts.pair(3, t=5, m=2)   # reads rows 5 and 7 of expert 3 only

    Raises:
        ExpertsError: No experts, or experts that cannot be matched together (``mismatch``).
        StorageError: A damaged or foreign manifest, preprocessing or trajectory file.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        files = expert_files(self.folder)
        if not files:
            raise ExpertsError(
                f"No experts found in {self.folder}. Train them first with `dpd experts` (same --dataset, "
                "--model, --width, --zca), or pass --experts pointing at an experts folder."
            )
        self.manifest = read_manifest(self.folder)
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
        """Every file holds a trajectory of the first one's model and length; the preprocessing matches."""
        first = self.files[0]
        self.meta = first.meta
        shape = _trajectory_shape(first.path, self.meta)
        self.spec = spec_from_meta(first.path, self.meta["model"])
        self.layout, self.epochs = self.meta["layout"], self.meta["epochs"]
        for f in self.files:
            _check_trajectory(f.path, f.header, shape)
            problem = mismatch(f.path, f.meta, self.meta, first.path.name, self.compat)
            if problem:
                raise ExpertsError(problem)
        self.preprocess = load_preprocess(self.folder, self.spec)
        recorded = self.meta.get("preprocess_fingerprint")
        if recorded is not None and recorded != self.preprocess.fingerprint():
            raise StorageError(_fingerprint_message(self.folder / PREPROCESS, self.preprocess.fingerprint(), recorded))

    def __len__(self) -> int:
        return len(self.files)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> ExpertSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pair(self, index: int, t: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``t`` and ``t + m`` of expert ``index`` (CPU float32), checked finite."""
        rows = self.files[index].rows("trajectory", [t, t + m])
        if not torch.isfinite(rows).all():
            raise StorageError(
                f"{self.files[index].path} holds NaN or Inf parameters at epoch {t} or {t + m}. Delete it and rerun "
                "`dpd experts`."
            )
        return rows[0], rows[1]


# --- the lenient check ------------------------------------------------------------------------
def check_trajectory(path: Path) -> dict:
    """One trajectory file's facts, after the checks ``ExpertSet`` makes of it alone (header only)."""
    path = Path(path)
    header, meta = storage.read_meta(path, TRAJECTORY)
    shape = _trajectory_shape(path, meta)
    _check_trajectory(path, header, shape)
    accs = meta.get("test_accuracy") if isinstance(meta.get("test_accuracy"), list) else []
    return {
        "meta": meta,
        "index": meta.get("index"),
        "epochs": shape[0] - 1,
        "n_params": shape[1],
        "test_accuracy": [json_number(a) for a in accs],
        "final_test_accuracy": json_number(accs[-1]) if accs else None,
        "train_images_per_s": json_number(meta.get("train_images_per_s")),
        "seed": meta.get("seed"),
    }


def check(folder: Path, verify: bool = False) -> dict:
    """What an experts folder holds and what is wrong with it, from headers and JSON only; with ``verify``, the
    tensor data of the trajectories and the preprocessing is checked against their checksums too (every byte read).

    Nothing here raises for a damaged file: each problem is a sentence in ``problems`` (an expert's
    own also in its entry's ``error``). The rules are ``ExpertSet``'s, so an empty ``problems`` with
    at least one expert means ``dpd distill`` can use the folder.

    Returns:
        ``{"manifest", "compat", "n_planned", "being_written", "state", "preprocess": {"zca", "fingerprint"}
        | None, "experts": [entry, ...], "reference_meta", "problems"}``. An entry is ``{"file", "size",
        "valid", "error", "compatible"}`` plus ``check_trajectory``'s facts but ``meta`` when valid;
        ``reference_meta`` is the metadata of the first valid file, which the others are compared with.
    """
    folder = Path(folder)
    problems: list[str] = []
    manifest: dict = {}
    mpath, ppath = folder / MANIFEST, folder / PREPROCESS
    try:
        manifest = read_manifest(folder)
    except StorageError as e:
        problems.append(
            f"{short_message(e, mpath)} `dpd distill` refuses this folder until it is fixed."
            if mpath.exists()
            else "experts.json is missing, so `dpd distill` refuses this folder. Rerun `dpd experts --out` on this "
            "folder with the experts' settings to rewrite it (finished experts are kept)."
        )
    compat = manifest.get("compat") or {}
    preprocess = None
    try:
        preprocess = preprocess_file.check_header(ppath)
        if verify:
            storage.verify_data(ppath)
    except StorageError as e:
        problems.append(
            short_message(e, ppath)
            if ppath.exists()
            else "preprocess.safetensors is missing (the normalisation the experts saw); `dpd distill` cannot use "
            "this folder. Rerun `dpd experts --out` on it with the experts' settings."
        )

    experts: list[dict] = []
    ref: tuple[str, dict] | None = None  # the first valid file and its metadata
    for p in expert_files(folder):
        entry: dict = {"file": p.name, "size": None, "valid": False, "error": None, "compatible": False}
        experts.append(entry)
        with contextlib.suppress(OSError):
            entry["size"] = p.stat().st_size
        try:
            facts = check_trajectory(p)
            if verify:
                storage.verify_data(p)
        except StorageError as e:
            entry["error"] = short_message(e, p)
            problems.append(entry["error"])
            continue
        meta = facts.pop("meta")
        entry.update(valid=True, **facts)
        ref = ref or (p.name, meta)
        found = mismatch(p, meta, ref[1], ref[0], compat)
        entry["compatible"] = not found
        if found:
            problems.append(short_message(found, p))
    if not experts:
        problems.append("No expert files (expert_*.safetensors) yet: train them with `dpd experts`.")
    ref_meta = ref[1] if ref else None
    if ref_meta is not None:
        if compat and compat.get("model") not in (None, ref_meta.get("model")):
            problems.append(
                f"experts.json's model {model_tag(compat.get('model'))} differs from the files' "
                f"{model_tag(ref_meta.get('model'))}."
            )
        recorded = ref_meta.get("preprocess_fingerprint")
        if preprocess and recorded is not None and preprocess["fingerprint"] != recorded:
            problems.append(short_message(_fingerprint_message(ppath, preprocess["fingerprint"], recorded), ppath))
    n_planned = planned_count(manifest)
    being_written = storage.is_locked(folder)
    return {
        "manifest": manifest or None,
        "compat": compat,
        "n_planned": n_planned,
        "being_written": being_written,
        "state": state(len(experts), n_planned, being_written),
        "preprocess": preprocess,
        "experts": experts,
        "reference_meta": ref_meta,
        "problems": problems,
    }


def state(count: int, n_planned: int | None, being_written: bool) -> str:
    """``being written`` (a process holds the folder's lock), ``complete`` (at least the planned number of
    experts, or no plan recorded), ``incomplete`` (fewer: a stopped run; rerunning it trains the rest) or ``empty``."""
    if being_written:
        return "being written"
    if count == 0:
        return "empty"
    return "incomplete" if n_planned is not None and count < n_planned else "complete"


def summarize(folder: Path) -> dict:
    """What ``dpd experts --json`` reports: the folder, its ``compat`` and each expert's metadata, and
    ``invalid`` (``[{"file", "error"}]``) only when some file is unreadable."""
    facts = check(folder)
    out: dict = {"folder": str(folder), "compat": facts["compat"] or None, "experts": []}
    for e in facts["experts"]:
        if e["valid"]:
            out["experts"].append(
                {k: e[k] for k in ("file", "index", "epochs", "final_test_accuracy", "train_images_per_s")}
            )
        else:
            out.setdefault("invalid", []).append({"file": e["file"], "error": e["error"]})
    return out
