"""What a distillation starts from and carries: its settings completed from the experts folder, the checks
of the experts against them, the initial images, each iteration's random draws, and the state a resume needs.

``with_experts`` is the one place where settings are adopted from an experts folder: a pure function
of the user's settings and the folder's manifest (``adopt``), applied before the recipe is built.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from dpd_cli.artifacts import layout, run_settings
from dpd_cli.artifacts.experts import (
    ExpertSet,
    expert_files,
    folders_under,
    old_preprocess_message,
    preprocess_scheme,
    read_manifest,
)
from dpd_cli.config.settings import DistillSettings
from dpd_cli.core import matching
from dpd_cli.data import Preprocess
from dpd_cli.data.preprocess import PREPROCESS_SCHEME
from dpd_cli.errors import DataError, DivergedError, ExpertsError, OutputExistsError, SettingsError, StorageError
from dpd_cli.events import Message, NullSink, Sink
from dpd_cli.io import paths
from dpd_cli.models import ModelSpec
from dpd_cli.recipes.runtime import dataset_key, derive_seed
from dpd_cli.text import plural

__all__ = [
    "DistillState",
    "RESUMABLE",
    "ADJUSTABLE",
    "FROM_EXPERTS",
    "adopt",
    "with_experts",
    "with_experts_sources",
    "check_data",
    "check_experts",
    "init_images",
    "draw_plan",
    "other_settings",
    "seed_settings",
]


@dataclass
class DistillState:
    """Everything an exact resume needs besides the settings and the iteration's seeds."""

    iteration: int  # iterations finished
    images: torch.Tensor  # (n, C, H, W) training space
    lr: torch.Tensor  # () alpha
    momentum_images: torch.Tensor  # like images
    momentum_lr: torch.Tensor  # ()
    prune_counts: torch.Tensor  # (P,) int32: how often each parameter was pruned
    prune_state: torch.Tensor | None = None  # (P,): EMA of scores, or the previous scores (network mode)
    label_logits: torch.Tensor | None = None  # (n, C) learned soft labels (--soft-labels)
    momentum_labels: torch.Tensor | None = None  # like label_logits

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds (the prune state as float32)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)[1:] if getattr(self, f.name) is not None}
        if self.prune_state is not None:
            out["prune_state"] = self.prune_state.float()
        return out


#: Settings that may change between a run and its resume (all others are fixed by the run's settings hash).
RESUMABLE = tuple(
    "iterations checkpoint_every keep_checkpoints log_every device threads out experts resume force data_dir "
    "dist_timeout host_memory cuda_graphs keep_graphs deterministic".split()
)
#: Settings a resume may change, each change recorded (``settings.json`` "changes", the next metrics line); the
#: settings hash covers the values the run started with.
ADJUSTABLE = ("lr_img", "lr_lr")
NORM_BATCH_RANKS = (
    "--norm batch cannot be distilled over several processes: batch norm mixes the rows that the ranks split "
    "between them, so the result would depend on the number of ranks. Use --norm instance (MTT's), or run one process."
)
#: Settings an experts folder decides unless the user gives them (the network, the data it saw).
FROM_EXPERTS = tuple("dataset data_dir model width depth norm pool zca train_per_class val_per_class".split())
_NETWORK = ("width", "depth", "norm", "pool")  # the settings a ModelSpec records under the same names


def image_step(s: DistillSettings, it: int, grad: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Iteration ``it``'s image gradient and step size under ``--clip-img`` (the gradient scaled to norm <= C, on the
    device: no host sync) and ``--lr-img-warmup``, and the gradient's norm before clipping (a device scalar)."""
    norm = grad.norm().float()
    if s.clip_img:
        grad = grad * (s.clip_img / norm.clamp_min(s.clip_img)).to(grad.dtype)
    return grad, s.lr_img * (min(1.0, (it + 1) / s.lr_img_warmup) if s.lr_img_warmup else 1.0), norm


def adopt(s: DistillSettings, manifest: dict, spec: ModelSpec) -> DistillSettings:
    """``s`` with every setting of ``FROM_EXPERTS`` that the user did not give taken from the experts'
    manifest and network (the network's values win)."""
    given = s.model_fields_set
    recorded = {**(manifest.get("settings") or {}), **{k: getattr(spec, k) for k in _NETWORK}, "model": spec.name}
    adopted = {k: recorded[k] for k in FROM_EXPERTS if k not in given and k in recorded}
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
        # What the manifest alone tells, before any dataset is loaded.
        if preprocess_scheme(experts.compat) != PREPROCESS_SCHEME:
            raise ExpertsError(old_preprocess_message(experts.folder, experts.compat))
        want = {"dataset": dataset_key(s), "zca": s.zca, "val_per_class": s.val_per_class}
        _refuse_misfit(experts.folder, experts.compat, want, "those settings")
    except BaseException:
        experts.close()
        raise
    return s, experts


def with_experts_sources(s: DistillSettings) -> tuple[DistillSettings, dict[str, str]]:
    """The settings a run of ``s`` uses, completed by ``with_experts`` without running anything, and the
    source of each value the experts gave (``experts``), for ``--print-config``.

    The folder chosen under the experts root (no ``--experts``) becomes ``experts``, so that the printed
    settings, fed back, use the same folder. With no experts yet (no fitting folder under the root, or an
    ``--experts`` folder without experts files) ``s`` is returned as it is: the run stops there with the reason.

    Raises:
        ExpertsError, StorageError: The experts folder is damaged or contradicts the settings given.
    """
    sources = {}
    if s.experts and not expert_files(Path(s.experts)):
        return s, {}
    if not s.experts:
        try:
            folder = _choose_experts_folder(s, NullSink())
        except ExpertsError:
            return s, {}
        s = type(s).model_validate({**{k: getattr(s, k) for k in s.model_fields_set}, "experts": folder})
        sources["experts"] = "the newest fitting folder under the experts root"
    completed, experts = with_experts(s, NullSink())
    experts.close()
    sources.update({k: "experts" for k in completed.model_fields_set - s.model_fields_set})
    return completed, sources


def _choose_experts_folder(s: DistillSettings, sink: Sink) -> Path:
    """The experts folder the user most plausibly means when --experts is not given, announced on the first line.

    Candidates are the folders under the experts root whose manifest agrees with every dataset or
    network setting the user gave; the most recently written one wins.
    """
    root = paths.experts_root()
    given = [k for k in FROM_EXPERTS if k != "data_dir" and k in s.model_fields_set]
    want = {k: dataset_key(s) if k == "dataset" else getattr(s, k) for k in given}
    candidates, folders = [], folders_under(root)
    for folder in folders:
        try:
            compat = read_manifest(folder)["compat"]
            has = {**compat, **compat["model"], "model": compat["model"].get("name")}  # the folder's settings
        except (StorageError, KeyError, TypeError, AttributeError):
            continue
        if all(has.get(k) == v for k, v in want.items()):
            candidates.append(folder)
    if not candidates:
        if not folders:
            raise ExpertsError(
                f"No experts found in the experts root {root} (set by DPD_EXPERTS_ROOT). Train them first with `dpd experts` "
                "(same --dataset, --model, --width, --zca), or pass --experts pointing at an experts folder."
            )
        wanted = ", ".join(f"{k} {getattr(s, k)}" for k in given)
        raise ExpertsError(
            f"None of the experts folders under {root} fits these settings ({wanted}): "
            + ", ".join(str(p) for p in folders[:8])
            + ("..." if len(folders) > 8 else "")
            + ". Train matching experts first with `dpd experts`, leave those settings out, or pass --experts."
        )
    more = f"the newest of {len(candidates)} matching folders; " if len(candidates) > 1 else ""
    sink.emit(Message(f"Using experts {candidates[0]} ({more}pass --experts to choose another)."))
    return candidates[0]


def _refuse_misfit(folder: Path, have: dict, want: dict, which: str) -> None:
    """Refuse experts whose recorded values (``have``) differ from those the settings give (``want``)."""
    diffs = [f"{k}: experts have {have.get(k)!r}, settings give {v!r}" for k, v in want.items() if have.get(k) != v]
    if diffs:
        raise ExpertsError(
            f"The experts in {folder} do not fit these settings ({'; '.join(diffs)}). Leave {which} out to use the "
            "experts' own, or train matching experts with `dpd experts`."
        )


def check_experts(experts: ExpertSet, s: DistillSettings, spec: ModelSpec) -> None:
    """The experts' network is the one the settings describe, and they have the epochs the settings reach."""
    _refuse_misfit(experts.folder, experts.spec.to_dict(), spec.to_dict(), "the network settings")
    # Start epochs t are 0..T+-1 and the target is t+M, so T+ - 1 + M must be an epoch the experts have.
    if s.max_start_epoch - 1 + s.expert_epochs > experts.epochs:
        raise ExpertsError(
            f"--max-start-epoch {s.max_start_epoch} with --expert-epochs {s.expert_epochs} needs expert epoch "
            f"{s.max_start_epoch - 1 + s.expert_epochs}, but the experts in {experts.folder} were trained for {experts.epochs}. "
            f"Lower them, or train experts with --epochs {s.max_start_epoch - 1 + s.expert_epochs} or more."
        )


def check_data(s: DistillSettings, ds) -> None:
    """The dataset holds ``ipc`` images of every class, and a synthetic mini-batch fits in the synthetic set."""
    counts = ds.class_counts()
    if s.ipc > min(counts):
        c = counts.index(min(counts))
        raise DataError(
            f"--ipc {s.ipc} is larger than class {ds.classes[c]!r} of {ds.name}, which has "
            f"{plural(min(counts), 'training image')}. Use --ipc {min(counts)} or less."
        )
    n = s.ipc * ds.n_classes
    if s.batch_syn is not None and s.batch_syn > n:
        raise SettingsError(
            f"--batch-syn {s.batch_syn} is larger than the synthetic set, which has {n} images (--ipc {s.ipc} × "
            f"{ds.n_classes} classes). Use --batch-syn {n} or less, or leave it out to use all images in every step."
        )


def init_images(s: DistillSettings, ds, pre: Preprocess, device, accept=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` images per class, class-major: random real ones, the first random real ones ``accept`` passes
    (``--init real-correct``: those the label expert classifies correctly), or noise. ``check_data`` first."""
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
                    f"--init real-correct: expert 0 classifies only {plural(len(found), 'training image')} of class "
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


def seed_settings(s: DistillSettings) -> list[DistillSettings]:
    """The runs of ``--seeds``: each the settings as given, with ``--seed S`` and, with ``--out X``, ``--out X-sS``
    (without: the default run directory, which names the seed), and no ``--seeds``."""
    given = {k: getattr(s, k) for k in s.model_fields_set if k != "seeds"}
    outs = [{"out": s.out.with_name(f"{s.out.name}-s{seed}")} if s.out else {} for seed in s.seeds]
    return [type(s).model_validate({**given, "seed": seed, **out}) for seed, out in zip(s.seeds, outs, strict=True)]


def check_resumable(
    run_dir: Path, s: DistillSettings, shash: str, image_shape: tuple, n_params: int, path: Path, t: dict, meta: dict
) -> None:
    """Refuse to resume from checkpoint ``path`` (tensors ``t``, metadata ``meta``) if it is not this run's."""
    if ("label_logits" in t) != s.soft_labels:
        has = "soft labels" if "label_logits" in t else "hard labels"
        raise OutputExistsError(
            f"{run_dir} was distilled with {has}; --soft-labels cannot be switched "
            f"{'off' if 'label_logits' in t else 'on'} on --resume. Resume with the run's own setting, or start "
            "over with --force (or another --out)."
        )
    if meta.get("settings_hash") != shash:
        raise other_settings(run_dir, s)
    if tuple(t["images"].shape) != image_shape:
        raise StorageError(f"{path}: images have shape {tuple(t['images'].shape)}, expected {image_shape}.")
    if t["prune_counts"].numel() != n_params:
        raise StorageError(
            f"{path}: prune counts for {t['prune_counts'].numel()} parameters, the model has {n_params}. "
            "Start over with --force."
        )
    if int(meta["iteration"]) > s.iterations:
        raise OutputExistsError(
            f"{run_dir} has a checkpoint at iteration {meta['iteration']}, past --iterations {s.iterations}: "
            f"resuming would label that later state as iteration {s.iterations}. Resume with --iterations "
            f"{meta['iteration']} or more, evaluate an earlier checkpoint directly (dpd evaluate "
            "RUN/checkpoints/ckpt-NNNNNN.safetensors), or use --force to start over."
        )


def diverged(iteration: int, loss: float, a: float, checkpoints: list[Path]) -> DivergedError:
    """The error for a loss that became NaN/Inf or an alpha that became non-positive at ``iteration``."""
    flag, what = ("--lr-img (or --lr-lr)", f"loss became {loss}")
    if math.isfinite(loss):
        flag, what = "--lr-lr", f"the learning rate alpha became {a}"
    how = (
        f"--resume: it continues from the last good checkpoint, {checkpoints[0].name}, and records the change (or "
        "with --force instead of --resume, to start over)"
        if checkpoints
        else "--force, to start over"
    )
    return DivergedError(
        f"Distillation diverged at iteration {iteration}: {what}. Rerun the same command with a lower {flag} and {how}."
    )


def resume_message(run_dir: Path, aside: list, iteration: int | None, reached: int) -> Message:
    """What a resume does: the damaged checkpoints it moved aside (``RunWriter.set_aside_damaged``), the checkpoint
    it continues from (``iteration``; ``None``: there is none, it starts again from iteration 0) and how many
    iterations it redoes (the run had got to ``reached``)."""
    parts = [f"{p.name} is damaged ({why}): moved aside to {new.name}" for p, why, new in aside]
    if iteration is None:
        parts.append(
            f"{run_dir} has no checkpoint {'left' if aside else 'yet'}: starting again from iteration 0 with the same "
            "settings (every random choice is seeded, so the result is the same)"
        )
    else:
        name = layout.checkpoint_path(run_dir, iteration).name
        parts.append(f"{'r' if aside else 'R'}esuming {run_dir} from {name} (iteration {iteration})")
    text, start = "; ".join(parts), iteration or 0
    if reached > start:
        n, span = reached - start, f"{start + 1}-{reached}" if reached - start > 1 else str(reached)
        text += f", {n} iteration{'s' * (n > 1)} redone ({span})"
        if not aside:
            text += f": the run had got to iteration {reached}" + (
                ", past its newest checkpoint" if iteration is not None else ""
            )
    return Message(text + ".", "warning" if aside else "info")


def other_settings(run_dir: Path, s: DistillSettings) -> OutputExistsError:
    """The refusal to resume a run with settings outside ``RESUMABLE`` changed, naming each one that differs
    from the run's ``settings.json`` with both values."""
    flags = ", ".join(f"--{k.replace('_', '-')}" for k in RESUMABLE + ADJUSTABLE if k not in ("resume", "force"))
    record, _ = run_settings.read(run_dir)
    recorded = (record or {}).get("settings") or {}
    given = s.model_dump(mode="json")
    diffs = [
        f"--{k.replace('_', '-')}: the run has {recorded.get(k)!r}, settings give {v!r}"
        for k, v in given.items()
        if k not in RESUMABLE + ADJUSTABLE and recorded.get(k, v) != v
    ]
    # Settings this dpd does not know (written by another version).
    diffs += [f"{k}: the run has {v!r}, this dpd has no such setting" for k, v in recorded.items() if k not in given]
    which = f"({'; '.join(diffs)})" if diffs else "(the run's settings.json has them)"
    return OutputExistsError(
        f"{run_dir} was started with other settings {which}. Resume with the same "
        f"settings (only {flags} may change), or use --force to start over."
    )


def cuda_graphs(s: DistillSettings, device: torch.device, group, pruner, in_batch: bool = False) -> str | None:
    """``None`` when the meta-gradient is replayed from CUDA graphs; else why not (``""``: not asked for)."""
    if device.type != "cuda" or not s.cuda_graphs:
        return ""
    if group is not None:
        return "under torchrun"
    if in_batch:
        return "a batch of runs: --seeds or dpd study"
    if pruner.keeps_state:
        return "--prune-mask ema and --prune-mode network carry state across iterations"
    return None


def graph_options(s: DistillSettings, state) -> dict:
    """``GraphedMetaGradient``'s settings for this run (stateless prune settings only)."""
    n = len(state.images)
    batch = s.batch_syn if s.batch_syn and s.batch_syn < n else None
    return {
        "memory": s.memory,
        "n_steps": s.syn_steps,
        "batch": batch,
        "dsa": s.dsa,
        "label_logits": state.label_logits,
        "keep_graphs": s.keep_graphs,
    }


def label_epoch(s: DistillSettings, experts: ExpertSet) -> int:
    return experts.epochs if s.label_epoch is None else s.label_epoch


def label_expert(s: DistillSettings, experts: ExpertSet, device) -> torch.Tensor:
    """The parameters (expert 0 at --label-epoch) whose logits initialise the soft labels."""
    epoch = label_epoch(s, experts)
    if epoch > experts.epochs:
        raise ExpertsError(f"--label-epoch {epoch}: the experts in {experts.folder} have epochs 0..{experts.epochs}.")
    return experts.files[0].rows("trajectory", [epoch])[0].to(device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU -> device without a stream sync: copies from pinned memory are truly asynchronous."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def layer_totals(prune_counts: torch.Tensor, layer_ids: torch.Tensor, n_layers: int) -> list[int]:
    """How often the parameters of each layer were pruned in all."""
    totals = torch.zeros(n_layers, dtype=torch.int64, device=prune_counts.device)
    return [int(v) for v in totals.index_add_(0, layer_ids, prune_counts.long()).tolist()]


def initial_soft_labels(fm, theta: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, s, experts) -> tuple:
    """The label expert's logits on the initial images (float32), and what ``settings.json`` records of them."""
    with torch.no_grad():
        logits = torch.cat([fm(theta, images[i : i + 256]) for i in range(0, len(images), 256)])
    right = float((logits.argmax(1) == labels).float().mean())
    return logits.float(), {"expert": 0, "epoch": label_epoch(s, experts), "initial_accuracy": right}
