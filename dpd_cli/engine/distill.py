"""``dpd distill``: the distillation loop around ``matching.meta_gradient``.

Run directory::

    settings.json                 resolved settings, versions, experts folder, settings hash
    synthetic.safetensors         images (training space), labels, lr (alpha), normalisation/ZCA
    checkpoints/ckpt-NNNNNN.safetensors   everything needed for an exact resume (last two kept)
    metrics.jsonl                 one JSON line per iteration
    prune_frequency.safetensors   per-parameter prune counter (P,), with the layer layout
    grid.png                      the synthetic images, de-normalised, ZCA undone

Everything random in iteration ``i`` is derived from ``(seed, i)``: the expert, the start
epoch, the mini-batches and the DSA seeds. A resume therefore needs only the iteration
number besides the tensors, and reproduces an uninterrupted run exactly on the same device.
A run stopped before its first checkpoint is resumed from iteration 0, which is the same thing.
Temporary files a killed process left (``.*.tmp``) are deleted once the lock is held.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch

from dpd_cli import interrupt, storage
from dpd_cli.data import Preprocess, load_dataset
from dpd_cli.engine import matching
from dpd_cli.engine.common import dataset_key, derive_seed, model_spec, resolve_device, set_threads, spec_from_meta, versions
from dpd_cli.engine.experts import ExpertSet, default_folder
from dpd_cli.errors import DataError, DivergedError, ExpertsError, OutputExistsError, StorageError
from dpd_cli.events import CheckpointSaved, DistillDone, DistillIteration, DistillStarted, Message, NullSink, Sink
from dpd_cli.images import save_grid
from dpd_cli.models import FlatModel, ModelSpec, build_model
from dpd_cli.settings import DistillSettings, settings_hash

__all__ = ["run", "default_run_dir", "RUN_FILES", "SYNTHETIC", "load_synthetic", "latest_checkpoint"]

SYNTHETIC = "synthetic.safetensors"
SETTINGS = "settings.json"
METRICS = "metrics.jsonl"
PRUNE = "prune_frequency.safetensors"
GRID = "grid.png"
CHECKPOINTS = "checkpoints"
RUN_FILES = (SETTINGS, SYNTHETIC, METRICS, PRUNE, GRID, CHECKPOINTS, "eval.json")
_KEEP_CHECKPOINTS = 2
# Settings that may change between a run and its resume.
_RESUMABLE = {"iterations", "checkpoint_every", "log_every", "device", "threads", "out", "experts", "resume", "force", "data_dir"}

_MOMENTUM = 0.5  # SGD momentum of the images and of alpha, as MTT


def default_run_dir(s: DistillSettings) -> Path:
    return Path("runs") / f"{s.dataset}-ipc{s.ipc}-rho{s.prune_ratio:g}-s{s.seed}"


def latest_checkpoint(run_dir: Path) -> list[Path]:
    """Checkpoint files, newest first."""
    return sorted((Path(run_dir) / CHECKPOINTS).glob("ckpt-*.safetensors"), reverse=True)


def _check_experts(experts: ExpertSet, s: DistillSettings, spec: ModelSpec) -> None:
    found_spec = experts.spec.to_dict()
    want_spec = spec.to_dict()
    diffs = [f"{k}: experts have {found_spec.get(k)!r}, settings give {v!r}" for k, v in want_spec.items() if found_spec.get(k) != v]
    for key, want in (("dataset", dataset_key(s)), ("zca", s.zca)):
        if experts.compat.get(key) != want:
            diffs.append(f"{key}: experts have {experts.compat.get(key)!r}, settings give {want!r}")
    if diffs:
        raise ExpertsError(
            f"The experts in {experts.folder} do not fit these settings ({'; '.join(diffs)}). "
            "Distil with the settings the experts were trained with, or train matching experts with `dpd experts`."
        )
    # Start epochs t are 0..T+-1 and the target is t+M, so T+ - 1 + M must be an epoch the experts have.
    if s.max_start_epoch - 1 + s.expert_epochs > experts.epochs:
        raise ExpertsError(
            f"--max-start-epoch {s.max_start_epoch} with --expert-epochs {s.expert_epochs} needs expert epoch "
            f"{s.max_start_epoch - 1 + s.expert_epochs}, but the experts in {experts.folder} were trained for {experts.epochs}. "
            f"Lower them, or train experts with --epochs {s.max_start_epoch - 1 + s.expert_epochs} or more."
        )


def _init_images(s: DistillSettings, ds, pre: Preprocess, device) -> tuple[torch.Tensor, torch.Tensor]:
    counts = ds.class_counts()
    if s.ipc > min(counts):
        c = counts.index(min(counts))
        raise DataError(
            f"--ipc {s.ipc} is larger than class {ds.classes[c]!r} of {ds.name}, which has {min(counts)} training images. "
            f"Use --ipc {min(counts)} or less."
        )
    g = torch.Generator().manual_seed(derive_seed(s.seed, "init"))
    labels = torch.arange(ds.n_classes).repeat_interleave(s.ipc)  # class-major: (n_classes * ipc,)
    if s.init == "real":
        picks = []
        for c in range(ds.n_classes):
            idx = torch.nonzero(ds.train_labels == c).flatten()
            picks.append(idx[torch.randperm(len(idx), generator=g)[: s.ipc]])
        images = pre.apply(ds.train_images[torch.cat(picks)])
    else:
        images = torch.randn(len(labels), *ds.image_shape, generator=g)
    return images.to(device), labels.to(device)


def _plan(rng: random.Random, n_images: int, s: DistillSettings, device) -> matching.StepPlan:
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


def _prepare_run_dir(run_dir: Path, s: DistillSettings) -> None:
    existing = [f for f in RUN_FILES if (run_dir / f).exists()]
    if not existing or s.resume:
        return
    if not s.force:
        raise OutputExistsError(
            f"{run_dir} already holds a run ({', '.join(existing)}). Continue it with --resume, start it over with "
            "--force, or choose another --out."
        )
    for f in existing:
        p = run_dir / f
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def load_synthetic(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load and validate a synthetic set (``synthetic.safetensors`` or a checkpoint).

    Every tensor and metadata entry that a command uses is checked (names, dtypes, shapes,
    finiteness, label range, class names) so that a damaged or foreign file is refused here
    with a ``StorageError``, never half-used.
    """
    path = Path(path)
    header, raw = storage.read_header(path)
    fmt = raw.get("format")
    if fmt not in ("dpd.synthetic", "dpd.checkpoint"):
        raise StorageError(f"{path} is not a synthetic set or checkpoint written by dpd distill (format {fmt!r}).")
    required = {"images": (torch.float32, 4), "labels": (torch.int64, 1), "lr": (torch.float32, 0), "norm_mean": (torch.float32, 1), "norm_std": (torch.float32, 1)}
    if fmt == "dpd.checkpoint":
        required.update(momentum_images=(torch.float32, 4), momentum_lr=(torch.float32, 0), prune_counts=(torch.int32, 1))
    t, meta = storage.load_tensors(path, fmt, required)
    hint = "It is damaged or was not written by this dpd."
    for k in ("model", "classes", "dataset"):
        if k not in meta:
            raise StorageError(f"{path} lacks the metadata entry {k!r}; it was not written by this dpd.")
    spec = spec_from_meta(path, meta["model"])
    classes = meta["classes"]
    if not isinstance(classes, list) or len(classes) != spec.n_classes or not all(isinstance(c, str) for c in classes):
        raise StorageError(f"{path}: the metadata entry 'classes' is not a list of {spec.n_classes} class names. {hint}")
    if not isinstance(meta["dataset"], str) or not meta["dataset"]:
        raise StorageError(f"{path}: the metadata entry 'dataset' is not a dataset name. {hint}")
    for k, kind in (("settings", dict), ("iteration", int), ("iterations", int), ("ipc", int)):
        if k in meta and (not isinstance(meta[k], kind) or isinstance(meta[k], bool)):
            raise StorageError(f"{path}: the metadata entry {k!r} is malformed ({str(meta[k])[:100]}). {hint}")
    if fmt == "dpd.checkpoint" and not (isinstance(meta.get("iteration"), int) and meta["iteration"] >= 0):
        raise StorageError(f"{path}: a checkpoint needs a non-negative 'iteration' metadata entry. {hint}")
    images, labels = t["images"], t["labels"]
    if tuple(images.shape[1:]) != (spec.channels, *spec.image_size) or len(images) == 0:
        raise StorageError(f"{path}: images have shape {tuple(images.shape)}, but the model takes ({spec.channels}, {spec.image_size[0]}, {spec.image_size[1]}) images. {hint}")
    if len(images) != len(labels):
        raise StorageError(f"{path}: {len(images)} images but {len(labels)} labels.")
    if labels.min() < 0 or labels.max() >= spec.n_classes:
        raise StorageError(f"{path}: labels must lie in 0..{spec.n_classes - 1}, found {int(labels.min())}..{int(labels.max())}. {hint}")
    if not torch.isfinite(images).all() or not torch.isfinite(t["lr"]) or t["lr"] <= 0:
        raise StorageError(f"{path} holds non-finite images or a non-positive learning rate.")
    c, d = spec.channels, spec.channels * spec.image_size[0] * spec.image_size[1]
    shapes = {"norm_mean": (c,), "norm_std": (c,)}
    zca = [k for k in ("zca_mean", "zca_matrix", "zca_inverse") if k in t]
    if zca:
        if len(zca) != 3:
            raise StorageError(f"{path} holds only part of the ZCA transform ({', '.join(zca)}). {hint}")
        shapes.update(zca_mean=(d,), zca_matrix=(d, d), zca_inverse=(d, d))
    if fmt == "dpd.checkpoint":
        shapes.update(momentum_images=tuple(images.shape), momentum_lr=())
    for k, shape in shapes.items():
        v = t[k]
        if tuple(v.shape) != shape or v.dtype != torch.float32 or not torch.isfinite(v).all():
            raise StorageError(f"{path}: tensor {k!r} is {v.dtype} {tuple(v.shape)}, expected finite float32 {shape}. {hint}")
    if not (t["norm_std"] > 0).all():
        raise StorageError(f"{path}: the normalisation std must be positive. {hint}")
    if fmt == "dpd.checkpoint" and (t["prune_counts"] < 0).any():
        raise StorageError(f"{path}: negative prune counts. {hint}")
    return t, meta


def run(settings: DistillSettings, sink: Sink | None = None) -> Path:
    """Distil a synthetic set; resumable, deterministic under ``settings.seed``.

    Args:
        settings: Resolved ``dpd distill`` settings.
        sink: Receives progress events.

    Returns:
        The run directory.

    Raises:
        UserError: Missing/mismatched experts, impossible IPC, existing output, divergence.
        Interrupted: A stop was requested; a checkpoint was written first.
    """
    s = settings
    sink = sink or NullSink()
    set_threads(s.threads)
    device = resolve_device(s.device)
    log_every = s.log_every or (1 if device.type == "cpu" else 10)
    ds = load_dataset(s.dataset, s.data_dir, s.train_per_class, s.seed)
    spec = model_spec(s, ds)
    experts = ExpertSet(s.experts or default_folder(dataset_key(s), spec.tag(), s.zca))
    _check_experts(experts, s, spec)
    pre = experts.preprocess
    run_dir = Path(s.out) if s.out else default_run_dir(s)
    if s.resume and not latest_checkpoint(run_dir) and not (run_dir / SETTINGS).exists():
        raise StorageError(f"Nothing to resume in {run_dir}: it has no checkpoint. Run without --resume to start it.")
    shash = settings_hash(s, exclude=_RESUMABLE)

    with experts, storage.lock_dir(run_dir, "a distillation run"), interrupt.safe_points():
        # Temp files of a killed process; with the lock held no other process is writing here.
        storage.remove_stale_temps(run_dir)
        storage.remove_stale_temps(run_dir / CHECKPOINTS)
        resume = s.resume
        if resume and not latest_checkpoint(run_dir):
            # Stopped before the first checkpoint: every choice is seeded, so starting over is the exact resume.
            _check_recorded_settings(run_dir, shash)
            sink.emit(Message(f"{run_dir} has no checkpoint yet: starting from iteration 0."))
            resume = False
        _prepare_run_dir(run_dir, s)
        torch.manual_seed(derive_seed(s.seed, "student"))
        net = build_model(spec).to(device)
        fm = FlatModel(net)
        sizes = [layer.numel for layer in fm.layers]
        layer_ids = fm.layer_ids(device)
        n_layers = len(sizes)

        images, labels = _init_images(s, ds, pre, device)
        lr = torch.tensor(s.lr_teacher, device=device)
        mom_images = torch.zeros_like(images)
        mom_lr = torch.zeros_like(lr)
        prune_counts = torch.zeros(fm.n_params, dtype=torch.int32, device=device)
        start_it = 0
        if resume:
            start_it, images, lr, mom_images, mom_lr, prune_counts = _load_checkpoint(run_dir, shash, device, images.shape, fm.n_params)
            _truncate_metrics(run_dir / METRICS, start_it)
        else:
            _truncate_metrics(run_dir / METRICS, 0)  # lines of a run stopped before its first checkpoint
            storage.atomic_write_text(run_dir / SETTINGS, json.dumps(_settings_record(s, shash, experts, spec), indent=2))
        pruned_total = _layer_totals(prune_counts, layer_ids, n_layers)
        iters_pruned = sum(1 for i in range(start_it) if _ratio_at(s, i) > 0)

        sink.emit(DistillStarted(str(run_dir), start_it, s.iterations, [(layer.name, layer.numel) for layer in fm.layers],
                                 fm.n_params, len(images), len(experts), str(device), s.memory, s.prune_ratio))
        pending: list[dict] = []  # per-iteration records not yet on disk; device tensors until flushed
        window_t0 = time.perf_counter()
        last_loss, t_run = float("nan"), time.perf_counter()

        def flush() -> None:
            nonlocal pending, window_t0, pruned_total, iters_pruned, last_loss
            if not pending:
                return
            # One host sync for the whole window.
            losses = torch.stack([p["loss"] for p in pending]).tolist()
            lrs = torch.stack([p["lr"] for p in pending]).tolist()
            pruned = torch.stack([p["pruned"] for p in pending]).round().long().tolist()
            dt = (time.perf_counter() - window_t0) / len(pending)
            lines = []
            for p, loss, a, pr in zip(pending, losses, lrs, pruned, strict=True):
                if not (loss == loss and abs(loss) != float("inf")) or not (a > 0 and a == a):
                    last = latest_checkpoint(run_dir)
                    kept = f"the last good checkpoint ({last[0].name}) is kept" if last else "no checkpoint was written yet"
                    what = f"loss became {loss}" if not (loss == loss and abs(loss) != float("inf")) else f"the learning rate alpha became {a}"
                    how = "rerun with --resume to continue from that checkpoint, or --force to start over" if last else "rerun with --force"
                    raise DivergedError(
                        f"Distillation diverged at iteration {p['iteration']}: {what}; {kept}. Lower --lr-img or --lr-lr "
                        f"(or --lr-teacher), then {how}."
                    )
                if sum(pr):
                    iters_pruned += 1
                pruned_total = [a_ + b_ for a_, b_ in zip(pruned_total, pr, strict=True)]
                rec = {"iteration": p["iteration"], "loss": loss, "lr": a, "expert": p["expert"], "start_epoch": p["start_epoch"],
                       "pruned": {layer.name: c for layer, c in zip(fm.layers, pr, strict=True)},
                       "pruned_fraction": sum(pr) / fm.n_params, "seconds": dt}
                lines.append(json.dumps(rec))
                sink.emit(DistillIteration(p["iteration"], s.iterations, loss, a, p["start_epoch"], pr, list(pruned_total),
                                           iters_pruned, dt))
                last_loss = loss
            _append_lines(run_dir / METRICS, lines)
            pending = []
            window_t0 = time.perf_counter()

        def save_all(iteration: int) -> None:
            flush()
            tensors = {"images": images, "labels": labels, "lr": lr, "momentum_images": mom_images, "momentum_lr": mom_lr,
                       "prune_counts": prune_counts, **pre.tensors()}
            meta = _synthetic_meta(s, shash, ds, spec, iteration, experts, pre)
            ckpt = run_dir / CHECKPOINTS / f"ckpt-{iteration:06d}.safetensors"
            storage.save_tensors(ckpt, tensors, "dpd.checkpoint", meta)
            for old in latest_checkpoint(run_dir)[_KEEP_CHECKPOINTS:]:
                old.unlink(missing_ok=True)
            _write_outputs(run_dir, images, labels, lr, prune_counts, pre, ds, fm, meta, iters_pruned)
            sink.emit(CheckpointSaved(iteration, str(ckpt)))

        for it in range(start_it, s.iterations):
            if interrupt.requested():
                save_all(it)
                raise interrupt.Interrupted(f"stopped after iteration {it}; rerun the same command with --resume to continue {run_dir}")
            rng = random.Random(derive_seed(s.seed, "iteration", it))
            e = rng.randrange(len(experts))
            t = rng.randrange(s.max_start_epoch)
            start, target = (_to_device(v, device) for v in experts.pair(e, t, s.expert_epochs))
            plan = _plan(rng, len(images), s, device)
            cfg = matching.PruneConfig(_ratio_at(s, it), s.prune_scope, s.prune_criterion)
            res = matching.meta_gradient(fm, images, labels, lr, start, target, plan, cfg, sizes, s.memory)
            with torch.no_grad():
                # SGD with momentum 0.5 (PyTorch semantics: buf = m * buf + g; p -= lr * buf).
                mom_images.mul_(_MOMENTUM).add_(res.grad_images)
                images.sub_(s.lr_img * mom_images)
                mom_lr.mul_(_MOMENTUM).add_(res.grad_lr)
                lr.sub_(s.lr_lr * mom_lr)
                if res.keep is None:
                    pruned = torch.zeros(n_layers, device=device)
                else:
                    dropped = (~res.keep).to(torch.int32)
                    prune_counts.add_(dropped)
                    pruned = torch.zeros(n_layers, device=device).index_add_(0, layer_ids, dropped.float())
            pending.append({"iteration": it + 1, "loss": res.loss.float(), "lr": lr.clone(), "pruned": pruned, "expert": e, "start_epoch": t})
            if len(pending) >= log_every:
                flush()
            if (it + 1) % s.checkpoint_every == 0 and it + 1 < s.iterations:
                save_all(it + 1)
        save_all(s.iterations)
        sink.emit(DistillDone(str(run_dir), s.iterations, last_loss, float(lr), time.perf_counter() - t_run))
    return run_dir


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU -> device without a stream sync: copies from pinned memory are truly asynchronous."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _ratio_at(s: DistillSettings, it: int) -> float:
    return 0.0 if it < s.prune_warmup else s.prune_ratio


def _layer_totals(prune_counts: torch.Tensor, layer_ids: torch.Tensor, n_layers: int) -> list[int]:
    totals = torch.zeros(n_layers, dtype=torch.float64, device=prune_counts.device).index_add_(0, layer_ids, prune_counts.double())
    return [int(v) for v in totals.tolist()]


def _settings_record(s: DistillSettings, shash: str, experts: ExpertSet, spec: ModelSpec) -> dict:
    return {
        "command": "distill",
        "settings": s.model_dump(mode="json"),
        "settings_hash": shash,
        "experts_folder": str(experts.folder.resolve()),
        "n_experts": len(experts),
        "model": spec.to_dict(),
        "versions": versions(),
    }


def _synthetic_meta(s, shash, ds, spec, iteration, experts, pre) -> dict:
    return {
        "dataset": ds.name,
        "classes": ds.classes,
        "model": spec.to_dict(),
        "iteration": iteration,
        "iterations": s.iterations,
        "ipc": s.ipc,
        "zca": s.zca,
        "settings": s.model_dump(mode="json"),
        "settings_hash": shash,
        "experts_folder": str(experts.folder.resolve()),
        "preprocess_fingerprint": pre.fingerprint(),
        "versions": versions(),
    }


def _write_outputs(run_dir, images, labels, lr, prune_counts, pre, ds, fm, meta, iters_pruned) -> None:
    storage.save_tensors(run_dir / SYNTHETIC, {"images": images, "labels": labels, "lr": lr, **pre.tensors()}, "dpd.synthetic", meta)
    storage.save_tensors(
        run_dir / PRUNE,
        {"counts": prune_counts},
        "dpd.prune_counts",
        {"layout": fm.layout, "iterations_pruned": iters_pruned, "iteration": meta["iteration"]},
    )
    save_grid(pre.invert(images), labels, ds.n_classes, run_dir / GRID)


def _other_settings(run_dir: Path) -> OutputExistsError:
    return OutputExistsError(
        f"{run_dir} was started with other settings (the run's settings.json has them). Resume with the same "
        "settings (only --iterations, --checkpoint-every, --log-every, --device, --threads, --experts, --data-dir may change), "
        "or use --force to start over."
    )


def _check_recorded_settings(run_dir: Path, shash: str) -> None:
    """Refuse to resume a checkpoint-less run whose settings.json records other settings."""
    try:
        recorded = json.loads((run_dir / SETTINGS).read_text(encoding="utf-8")).get("settings_hash")
    except (OSError, ValueError, AttributeError) as e:
        raise StorageError(f"{run_dir / SETTINGS} is unreadable ({e}) and there is no checkpoint to resume. Start over with --force.") from e
    if recorded != shash:
        raise _other_settings(run_dir)


def _load_checkpoint(run_dir: Path, shash: str, device, image_shape, n_params: int):
    errors = []
    for path in latest_checkpoint(run_dir):
        try:
            t, meta = load_synthetic(path)
        except StorageError as e:
            errors.append(str(e))
            continue
        if meta.get("settings_hash") != shash:
            raise _other_settings(run_dir)
        if tuple(t["images"].shape) != tuple(image_shape):
            raise StorageError(f"{path}: images have shape {tuple(t['images'].shape)}, expected {tuple(image_shape)}.")
        if t["prune_counts"].numel() != n_params:
            raise StorageError(f"{path}: prune counts for {t['prune_counts'].numel()} parameters, the model has {n_params}. Start over with --force.")
        return (
            int(meta["iteration"]),
            t["images"].to(device),
            t["lr"].to(device),
            t["momentum_images"].to(device),
            t["momentum_lr"].to(device),
            t["prune_counts"].to(device),
        )
    raise StorageError(f"No loadable checkpoint in {run_dir / CHECKPOINTS}: {' '.join(errors)} Start over with --force.")


def _append_lines(path: Path, lines: list[str]) -> None:
    storage.append_text(path, "".join(line + "\n" for line in lines))


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metric lines past the checkpoint being resumed from (and any torn last line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["iteration"] <= iteration:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    storage.atomic_write_text(path, "".join(k + "\n" for k in kept))


def summarize(run_dir: Path) -> dict:
    """A short description of a finished or partial run, from its files."""
    run_dir = Path(run_dir)
    t, meta = load_synthetic(run_dir / SYNTHETIC)
    return {
        "run_dir": str(run_dir),
        "synthetic": str(run_dir / SYNTHETIC),
        "dataset": meta["dataset"],
        "n_images": len(t["labels"]),
        "ipc": meta.get("ipc"),
        "iteration": meta.get("iteration"),
        "iterations": meta.get("iterations"),
        "lr": float(t["lr"]),
    }
