"""``dpd experts import``: MTT / FTD / DATM replay buffers -> a dpd experts folder.

Each expert of each buffer (``dpd_cli.artifacts.replay_buffer``) becomes one ``expert_NNNNN.safetensors``
whose rows are its snapshots flattened in ``module.parameters()`` order, dpd's ConvNet's order too. The
folder gets the ``experts.json`` and ``preprocess.safetensors`` that ``dpd experts`` would write, so
``dpd distill`` uses it like trained experts; what the buffers do not record is recorded as unknown
unless stated with flags. Every expert file names its source (the buffer's SHA-256 and the expert's
position), so a rerun converts only what is missing, however the buffers were renamed or reordered.
Nothing is written before every buffer was checked.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from dpd_cli import interrupt
from dpd_cli.artifacts import experts as experts_folder
from dpd_cli.artifacts import preprocess as preprocess_file
from dpd_cli.artifacts import replay_buffer
from dpd_cli.config.settings import ImportSettings
from dpd_cli.data import Preprocess, load_dataset
from dpd_cli.errors import ExpertsError, SettingsError, StorageError
from dpd_cli.events import ImportExpert, ImportFileDone, ImportFileStarted, ImportStarted, NullSink, Sink
from dpd_cli.io import storage
from dpd_cli.models import FlatModel, ModelSpec, build_model
from dpd_cli.recipes.experts import compat_record, differences, trajectory_meta
from dpd_cli.recipes.runtime import build_preprocess, dataset_key, model_spec, set_threads

__all__ = ["run", "default_folder", "SOURCE_FORMAT", "STATED"]

#: How experts.json and every expert file name what the experts were converted from.
SOURCE_FORMAT = "mtt-replay-buffer"
#: Training settings the buffers do not record; the user may state them (recorded, never checked).
STATED = ("lr", "momentum", "weight_decay", "batch", "dsa")
#: Settings a folder records that are always unknown for imported experts.
_NEVER_KNOWN = ("seed", "test_accuracy")


def default_folder(settings: ImportSettings, spec: ModelSpec) -> Path:
    """``<experts root>/<dataset>/<model tag>[-zca]-imported``: next to, never inside, trained experts."""
    trained = experts_folder.default_folder(dataset_key(settings), spec.tag(), bool(settings.zca))
    return trained.with_name(trained.name + "-imported")


def _require(s: ImportSettings) -> None:
    missing = []
    if s.dataset is None:
        missing.append("--dataset (the dataset the buffers' experts were trained on)")
    if s.zca is None:
        missing.append(
            "--zca or --no-zca (whether they were trained on ZCA-whitened images: MTT's buffer.py --zca; "
            "MTT writes buffers trained without ZCA to <dataset>_NO_ZCA folders)"
        )
    if missing:
        raise SettingsError(
            "`dpd experts import` needs " + " and ".join(missing) + ". The buffers hold parameters only, "
            "so dpd cannot tell; the preprocessing stored with the experts depends on both."
        )


def _compat(s: ImportSettings, spec: ModelSpec, epochs: int, stated: dict) -> dict:
    """The folder's ``compat`` record, in the keys ``dpd experts`` uses; unknown values are ``None``."""
    return compat_record({"dataset": dataset_key(s), "zca": s.zca, "epochs": epochs, **stated}, spec)


def run(settings: ImportSettings, sources: list[Path], sink: Sink | None = None) -> dict:
    """Convert the experts of the buffer files in ``sources`` (files, or folders holding them) into an experts folder.

    Returns:
        ``{"folder", "files": [{"file", "n_experts", "converted", "skipped"}], "n_experts", "converted",
        "epochs", "model_tag", "dataset", "zca", "stated", "unknown"}``.
    """
    s, sink = settings, sink or NullSink()
    _require(s)
    files = replay_buffer.find(sources)
    set_threads(s.threads)
    ds = load_dataset(s.dataset, s.data_dir)  # the full training set: MTT's experts saw all of it
    spec = model_spec(s, ds)
    folder = Path(s.out or default_folder(s, spec))
    with storage.removed_if_unused(folder), storage.lock_dir(folder, "experts"), interrupt.safe_points():
        storage.remove_stale_temps(folder)
        return _Import(folder, s, spec, ds, sink).run(files)


class _Import:
    """One import into one locked folder: what is there, and how the next buffer is added."""

    def __init__(self, folder: Path, s: ImportSettings, spec: ModelSpec, ds, sink: Sink):
        self.folder, self.s, self.spec, self.ds, self.sink = folder, s, spec, ds, sink
        self.layout = FlatModel(build_model(spec)).layout
        self.network = (
            f"{spec.tag()} for {ds.name} ({spec.channels}x{spec.image_size[0]}x{spec.image_size[1]} images, "
            f"{spec.n_classes} classes)"
        )
        self.manifest: dict | None = None
        self.pre: Preprocess | None = None
        self.checked: tuple = (None, None, None)  # (path, experts, epochs) of the buffer checked last
        self.stated = {k: getattr(s, k) for k in STATED}
        if (folder / experts_folder.MANIFEST).exists():
            self._adopt(experts_folder.read_manifest(folder))
        elif any(folder.glob("expert_*.safetensors")):
            raise ExpertsError(
                f"{folder} holds expert files but no experts.json, so it is not an import of this dpd. "
                "Import into another --out."
            )
        # (buffer SHA-256, position) -> folder index, for every expert already converted.
        self.done: dict[tuple[str, int], int] = {}
        self.taken: set[int] = set()  # indices of expert files present, readable or not
        for p in folder.glob("expert_*.safetensors"):
            stem = p.name.removeprefix("expert_").removesuffix(".safetensors")
            if not stem.isdigit():
                continue
            self.taken.add(int(stem))
            source = _source_of(p)
            if source is not None:
                self.done[(source["sha256"], source["position"])] = int(stem)

    def _adopt(self, manifest: dict) -> None:
        """Continue an earlier import into this folder, if the settings agree with it."""
        imported = manifest.get("import")
        if not isinstance(imported, dict) or imported.get("format") != SOURCE_FORMAT:
            raise ExpertsError(
                f"{self.folder} holds experts trained by `dpd experts`, not imported ones; imported "
                "experts cannot be added to it. Import into another --out."
            )
        found = manifest["compat"]
        want = {k: v for k, v in _compat(self.s, self.spec, found.get("epochs"), {}).items() if k not in STATED}
        # A stated value must agree; one left out now keeps the recorded one.
        diffs = differences(found, want | {k: self.stated[k] for k in STATED if k in self.s.model_fields_set})
        self.stated = {k: found.get(k) for k in STATED}
        if diffs:
            raise ExpertsError(
                f"The experts folder {self.folder} holds experts imported with other settings "
                f"({'; '.join(diffs)}). Use the same settings, or pass another --out."
            )
        self.manifest = manifest
        self.pre = experts_folder.load_preprocess(self.folder, self.spec)
        if self.pre.fingerprint() != manifest.get("preprocess_fingerprint"):
            raise StorageError(
                f"{self.folder / experts_folder.PREPROCESS} is not the preprocessing experts.json records. "
                "Import into a new --out."
            )

    # --- the buffers ----------------------------------------------------------------------------
    def run(self, files: list[Path]) -> dict:
        n_params = sum(math.prod(shape) for _, shape in self.layout)
        self.sink.emit(ImportStarted(str(self.folder), [str(f) for f in files], n_params))
        digests = self._check_all(files)
        report = []
        for k, (path, digest) in enumerate(zip(files, digests, strict=True)):
            self._stop_if_requested(path)
            self.sink.emit(ImportFileStarted(k, str(path)))
            t0 = time.perf_counter()
            n, converted, skipped = self._add(path, digest)
            report.append({"file": str(path), "n_experts": n, "converted": converted, "skipped": skipped})
            self.sink.emit(ImportFileDone(k, str(path), n, converted, skipped, time.perf_counter() - t0))
        return {
            "folder": str(self.folder),
            "files": report,
            "n_experts": len(self.done),
            "converted": sum(r["converted"] for r in report),
            "epochs": self.manifest["compat"]["epochs"] if self.manifest else None,
            "model_tag": self.spec.tag(),
            "dataset": dataset_key(self.s),
            "zca": self.s.zca,
            "stated": {k: v for k, v in self.stated.items() if v is not None},
            "unknown": self._unknown(),
        }

    def _check_all(self, files: list[Path]) -> list[str]:
        """Every buffer not imported before, checked before the first write (one at a time in memory): a bad
        buffer, or buffers of different lengths, add nothing. Returns the files' SHA-256 digests."""
        digests, first = [], None
        for path in files:
            self._stop_if_requested(path)
            digests.append(replay_buffer.sha256(path))
            if self._recorded(digests[-1]) is not None:
                continue
            experts, epochs = self._load(path)
            if self.manifest is not None and epochs != self.manifest["compat"]["epochs"]:
                raise ExpertsError(
                    f"{path}: its experts have {epochs} epochs, those in {self.folder} have "
                    f"{self.manifest['compat']['epochs']}. One folder holds experts of one length: import it "
                    "into another --out."
                )
            if first is not None and epochs != first[1]:
                raise ExpertsError(
                    f"{path}: its experts have {epochs} epochs, those of {first[0]} have {first[1]}. One folder holds "
                    "experts of one length: import them into separate --out folders. Nothing was converted."
                )
            first = first or (path, epochs)
            for j, expert in enumerate(experts):
                replay_buffer.flatten(path, j, expert)
            # One buffer to convert is not loaded again; of several, none is kept (one buffer in memory at a time).
            self.checked = (path, experts, epochs) if self.checked[0] is None and first[0] == path else (None,) * 3
        return digests

    def _load(self, path: Path) -> tuple[list, int]:
        """A buffer's experts, checked against the network, and their number of epochs."""
        experts = replay_buffer.load(path)
        return experts, replay_buffer.check_layout(path, experts, self.layout, self.network, _NETWORK_HINT)

    def _recorded(self, digest: str) -> int | None:
        """The number of experts of a buffer imported whole before, else ``None``."""
        sources = (self.manifest or {}).get("import", {}).get("sources", [])
        recorded = next((r for r in sources if r.get("sha256") == digest), None)
        if recorded and all((digest, j) in self.done for j in range(recorded["n_experts"])):
            return recorded["n_experts"]
        return None

    def _unknown(self) -> list[str]:
        return [k for k in STATED if self.stated[k] is None] + list(_NEVER_KNOWN)

    def _add(self, path: Path, digest: str) -> tuple[int, int, bool]:
        """Convert the experts of one checked buffer not yet in the folder: ``(experts in it, converted, skipped whole)``."""
        n = self._recorded(digest)
        if n is not None:
            return n, 0, True
        experts, epochs = self.checked[1:] if self.checked[0] == path else self._load(path)
        self.checked = (None, None, None)
        if self.manifest is None:
            self._create(epochs)
        converted = 0
        for j, expert in enumerate(experts):
            self._stop_if_requested(path)
            index = self.done.get((digest, j))
            skipped = index is not None
            if not skipped:
                index = min(set(range(len(self.taken) + 1)) - self.taken)  # the first free index: a deleted expert's
                self._save(index, path, digest, j, replay_buffer.flatten(path, j, expert), epochs)
                self.taken.add(index)
                self.done[(digest, j)] = index
                converted += 1
            self.sink.emit(ImportExpert(str(path), j, len(experts), index, skipped))
        self._record(path, digest, len(experts))
        return len(experts), converted, False

    def _stop_if_requested(self, path: Path) -> None:
        """A Ctrl-C stops here, between experts (each expert file is written whole or not at all)."""
        if interrupt.requested():
            raise interrupt.Interrupted(
                f"stopped while importing {path}; the experts converted so far are kept in {self.folder}. "
                "Rerun the same command to convert the rest (converted experts are skipped)"
            )

    def _create(self, epochs: int) -> None:
        """Write the preprocessing, then the manifest: the folder becomes usable once both exist."""
        s = self.s
        self.pre = build_preprocess(self.ds, bool(s.zca))
        preprocess_file.save(self.folder / experts_folder.PREPROCESS, self.pre)
        # The manifest's settings: what `dpd distill` adopts from a folder, plus what was stated.
        settings = s.model_dump(mode="json")
        settings.update(self.stated, train_per_class=None, val_per_class=None, epochs=epochs, depth=self.spec.depth)
        compat = _compat(s, self.spec, epochs, self.stated)
        imported = {"format": SOURCE_FORMAT, "sources": [], "unknown": self._unknown()}
        self.manifest = experts_folder.new_manifest(compat, settings, self.pre, None, **{"import": imported})
        experts_folder.write_manifest(self.folder, self.manifest)

    def _save(self, index: int, path: Path, digest: str, position: int, rows, epochs: int) -> None:
        source = {"format": SOURCE_FORMAT, "file": str(Path(path).resolve()), "sha256": digest, "position": position}
        training = {"epochs": epochs, **self.stated, "seed": None}
        meta = trajectory_meta(
            self.s, self.spec, self.layout, training, index, self.pre, self.manifest["settings"], source=source
        )
        experts_folder.save_trajectory(experts_folder.expert_path(self.folder, index), rows, meta)

    def _record(self, path: Path, digest: str, n: int) -> None:
        """Add (or refresh) the buffer's entry in experts.json once all its experts are in the folder."""
        sources = [r for r in self.manifest["import"]["sources"] if r.get("sha256") != digest]
        sources.append(
            {
                "file": str(Path(path).resolve()),
                "sha256": digest,
                "bytes": Path(path).stat().st_size,
                "n_experts": n,
                "experts": [self.done[(digest, j)] for j in range(n)],
            }
        )
        self.manifest["import"]["sources"] = sources
        experts_folder.write_manifest(self.folder, self.manifest)


_NETWORK_HINT = (
    "give the --dataset and the --width/--depth/--norm/--pool it was trained with (MTT's ConvNet is dpd's default: "
    "--width 128 --depth 3 --norm instance --pool avg; ConvNetD4: --depth 4; ConvNetW64: --width 64; ConvNetBN: --norm "
    "batch; ConvNetNN: --norm none; ConvNetMP: --pool max). The first layer's shape follows the images' channels, the "
    "last one's the number of classes."
)


def _source_of(path: Path) -> dict | None:
    """The ``source`` metadata entry of an expert file (``None`` if absent or unreadable)."""
    try:
        _, raw = storage.read_header(path)
        source = json.loads(raw.get("source", "null"))
    except (StorageError, ValueError):
        return None
    if isinstance(source, dict) and isinstance(source.get("sha256"), str) and type(source.get("position")) is int:
        return source
    return None
