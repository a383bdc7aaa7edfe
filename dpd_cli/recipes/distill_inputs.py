"""What a distillation starts from: its settings completed from the experts folder, the checks of the
experts against them, the initial images, and each iteration's random draws.

``with_experts`` is the one place where settings are adopted from an experts folder: a pure function
of the user's settings and the folder's manifest (``adopt``), applied before the recipe is built.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from dpd_cli.artifacts.experts import ExpertSet, folders_under, old_preprocess_message, preprocess_scheme, read_manifest
from dpd_cli.config.settings import DistillSettings
from dpd_cli.core import matching
from dpd_cli.data import Preprocess
from dpd_cli.data.preprocess import PREPROCESS_SCHEME
from dpd_cli.errors import DataError, ExpertsError, OutputExistsError, StorageError
from dpd_cli.events import Message, Sink
from dpd_cli.io import paths
from dpd_cli.models import ModelSpec
from dpd_cli.recipes.runtime import dataset_key, derive_seed

__all__ = [
    "RESUMABLE",
    "FROM_EXPERTS",
    "adopt",
    "with_experts",
    "check_experts",
    "init_images",
    "draw_plan",
    "other_settings",
]

#: Settings that may change between a run and its resume (all others are fixed by the run's settings hash).
RESUMABLE = (
    "iterations",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "device",
    "threads",
    "out",
    "experts",
    "resume",
    "force",
    "data_dir",
    "dist_timeout",
    "host_memory",
    "cuda_graphs",
    "keep_graphs",
    "deterministic",
)
#: Settings an experts folder decides unless the user gives them (the network, the data it saw).
FROM_EXPERTS = (
    "dataset",
    "data_dir",
    "zca",
    "train_per_class",
    "val_per_class",
    "model",
    "width",
    "depth",
    "norm",
    "pool",
)


def adopt(s: DistillSettings, manifest: dict, spec: ModelSpec) -> DistillSettings:
    """``s`` with every setting of ``FROM_EXPERTS`` that the user did not give taken from the experts'
    manifest and network."""
    given = s.model_fields_set
    recorded = manifest.get("settings") or {}
    adopted = {k: recorded[k] for k in FROM_EXPERTS if k not in given and k in recorded}
    adopted.update({k: getattr(spec, k) for k in ("width", "depth", "norm", "pool") if k not in given})
    if "model" not in given:
        adopted["model"] = spec.name
    if not adopted:
        return s
    return type(s).model_validate({**{k: getattr(s, k) for k in given}, **adopted})


def with_experts(s: DistillSettings, sink: Sink) -> tuple[DistillSettings, ExpertSet]:
    """The settings completed from the experts folder (``--experts``, or the best fit under the experts
    root), and its experts, opened (the caller closes them).

    Raises:
        ExpertsError: No experts folder fits, or the folder contradicts the settings given.
    """
    experts = ExpertSet(Path(s.experts) if s.experts else _choose_experts_folder(s, sink))
    try:
        s = adopt(s, experts.manifest, experts.spec)
        _check_manifest(experts.folder, experts.compat, s)
    except BaseException:
        experts.close()
        raise
    return s, experts


def _choose_experts_folder(s: DistillSettings, sink: Sink) -> Path:
    """The experts folder the user most plausibly means when --experts is not given, announced on the first line.

    Candidates are the folders under the experts root whose manifest agrees with every dataset or
    network setting the user gave; the most recently written one wins.
    """
    root = paths.experts_root()
    given = s.model_fields_set
    candidates = []
    for folder in folders_under(root):
        try:
            compat = read_manifest(folder)["compat"]
            model = compat["model"]
        except (StorageError, KeyError, TypeError):
            continue
        if "dataset" in given and compat.get("dataset") != dataset_key(s):
            continue
        if any(k in given and getattr(s, k) != compat.get(k) for k in ("zca", "val_per_class", "train_per_class")):
            continue
        if any(k in given and getattr(s, k) != model.get(k) for k in ("width", "depth", "norm", "pool")):
            continue
        if "model" in given and s.model != model.get("name"):
            continue
        candidates.append(folder)
    if not candidates:
        others = folders_under(root)
        if not others:
            raise ExpertsError(
                f"No experts found in the experts root {root} (set by DPD_EXPERTS_ROOT). Train them first with `dpd experts` "
                "(same --dataset, --model, --width, --zca), or pass --experts pointing at an experts folder."
            )
        wanted = ", ".join(
            f"{k} {getattr(s, k)}"
            for k in ("dataset", "model", "width", "depth", "norm", "pool", "zca", "train_per_class", "val_per_class")
            if k in given
        )
        raise ExpertsError(
            f"None of the experts folders under {root} fits these settings ({wanted}): "
            + ", ".join(str(p) for p in others[:8])
            + ("..." if len(others) > 8 else "")
            + ". Train matching experts first with `dpd experts`, leave those settings out, or pass --experts."
        )
    more = f"the newest of {len(candidates)} matching folders; " if len(candidates) > 1 else ""
    sink.emit(Message(f"Using experts {candidates[0]} ({more}pass --experts to choose another)."))
    return candidates[0]


def _check_manifest(folder: Path, compat: dict, s: DistillSettings) -> None:
    """What can be checked from the manifest alone, before any dataset is loaded."""
    if preprocess_scheme(compat) != PREPROCESS_SCHEME:
        raise ExpertsError(old_preprocess_message(folder, compat))
    diffs = []
    for key, want in (("dataset", dataset_key(s)), ("zca", s.zca), ("val_per_class", s.val_per_class)):
        if compat.get(key) != want:
            diffs.append(f"{key}: experts have {compat.get(key)!r}, settings give {want!r}")
    if diffs:
        raise ExpertsError(
            f"The experts in {folder} do not fit these settings ({'; '.join(diffs)}). Leave those settings out "
            "to use the experts' own, or train matching experts with `dpd experts`."
        )


def check_experts(experts: ExpertSet, s: DistillSettings, spec: ModelSpec) -> None:
    """The experts' network is the one the settings describe, and they have the epochs the settings reach."""
    found_spec = experts.spec.to_dict()
    diffs = [
        f"{k}: experts have {found_spec.get(k)!r}, settings give {v!r}"
        for k, v in spec.to_dict().items()
        if found_spec.get(k) != v
    ]
    if diffs:
        raise ExpertsError(
            f"The experts in {experts.folder} do not fit these settings ({'; '.join(diffs)}). Leave the network settings "
            "out to use the experts' own, or train matching experts with `dpd experts`."
        )
    # Start epochs t are 0..T+-1 and the target is t+M, so T+ - 1 + M must be an epoch the experts have.
    if s.max_start_epoch - 1 + s.expert_epochs > experts.epochs:
        raise ExpertsError(
            f"--max-start-epoch {s.max_start_epoch} with --expert-epochs {s.expert_epochs} needs expert epoch "
            f"{s.max_start_epoch - 1 + s.expert_epochs}, but the experts in {experts.folder} were trained for {experts.epochs}. "
            f"Lower them, or train experts with --epochs {s.max_start_epoch - 1 + s.expert_epochs} or more."
        )


def init_images(s: DistillSettings, ds, pre: Preprocess, device, accept=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` images per class, class-major: random real ones, the first random real ones ``accept`` passes
    (``--init real-correct``: those the label expert classifies correctly), or noise."""
    counts = ds.class_counts()
    if s.ipc > min(counts):
        c = counts.index(min(counts))
        raise DataError(
            f"--ipc {s.ipc} is larger than class {ds.classes[c]!r} of {ds.name}, which has {min(counts)} training images. "
            f"Use --ipc {min(counts)} or less."
        )
    g = torch.Generator().manual_seed(derive_seed(s.seed, "init"))
    labels = torch.arange(ds.n_classes).repeat_interleave(s.ipc)  # class-major: (n_classes * ipc,)
    if s.init in ("real", "real-correct"):
        picks = []
        for c in range(ds.n_classes):
            idx = torch.nonzero(ds.train_labels == c).flatten()
            order = idx[torch.randperm(len(idx), generator=g)]
            if accept is None:
                picks.append(order[: s.ipc])
                continue
            chosen: list[torch.Tensor] = []
            for i in range(0, len(order), 256):  # walk the permutation until ipc images pass
                part = order[i : i + 256]
                with torch.no_grad():
                    ok = accept(pre.apply(ds.train_images[part]).to(device), c).cpu()
                chosen.append(part[ok])
                if sum(len(p) for p in chosen) >= s.ipc:
                    break
            found = torch.cat(chosen)[: s.ipc]
            if len(found) < s.ipc:
                raise DataError(
                    f"--init real-correct: expert 0 classifies only {len(found)} training images of class "
                    f"{ds.classes[c]!r} correctly, fewer than --ipc {s.ipc}. Use --init real, or another --label-epoch."
                )
            picks.append(found)
        images = pre.apply(ds.train_images[torch.cat(picks)])
    else:
        images = torch.randn(len(labels), *ds.image_shape, generator=g)
    return images.to(device), labels.to(device)


def draw_plan(rng: random.Random, n_images: int, s: DistillSettings, device) -> matching.StepPlan:
    """One unroll's mini-batches and DSA seeds, drawn from the iteration's ``rng``."""
    batches: list[torch.Tensor | None] = []
    seeds: list[int | None] = []
    batch = s.batch_syn or n_images
    # Permutations are drawn on the device itself: no host-to-device copy (and sync) per step.
    order_gen = torch.Generator(device=device)
    order_gen.manual_seed(rng.getrandbits(63))
    order = None
    pos = n_images
    for _ in range(s.syn_steps):
        if batch >= n_images:
            batches.append(None)
        else:
            # Walk through a permutation, as an epoch over the synthetic set would (MTT).
            if pos + batch > n_images:
                order, pos = torch.randperm(n_images, generator=order_gen, device=device), 0
            batches.append(order[pos : pos + batch])
            pos += batch
        seeds.append(rng.getrandbits(63) if s.dsa else None)
    return matching.StepPlan(batches, seeds)


def other_settings(run_dir: Path) -> OutputExistsError:
    """The refusal to resume a run with settings outside ``RESUMABLE`` changed."""
    flags = ", ".join(f"--{k.replace('_', '-')}" for k in RESUMABLE if k not in ("resume", "force"))
    return OutputExistsError(
        f"{run_dir} was started with other settings (the run's settings.json has them). Resume with the same "
        f"settings (only {flags} may change), or use --force to start over."
    )
