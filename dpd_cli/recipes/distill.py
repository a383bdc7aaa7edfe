"""``dpd distill``: the distillation loop, as one recipe object around ``matching.meta_gradient``.

``DistillRecipe`` is what the CLI, the tests and the benchmarks all drive::

    with DistillRecipe(settings, sink) as recipe:   # setup(): experts, data, run dir, state (fresh or resumed)
        recipe.step()                               # one iteration
        recipe.checkpoint()                         # exact-resume state + outputs
        run_dir = recipe.train()                    # steps until done, with checkpoints and Ctrl-C handling

The state that must survive a resume lives in one ``DistillState``; a checkpoint holds exactly it.
Everything random in iteration ``i`` is derived from ``(seed, i)``: the expert, the start epoch,
the mini-batches and the DSA seeds. A resume therefore needs only the state, and reproduces an
uninterrupted run exactly on the same device. The run directory's files are described in
``dpd_cli.artifacts.run``; checkpoint 0 (the initial images) is always written and kept.
Temporary files a killed process left (``.*.tmp``) are deleted once the lock is held.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dpd_cli import interrupt
from dpd_cli.io import paths, storage
from dpd_cli.artifacts import evaluation
from dpd_cli.artifacts import metrics as metrics_file
from dpd_cli.artifacts import preprocess as preprocess_file
from dpd_cli.artifacts import prune_counts as prune_file
from dpd_cli.artifacts import layout
from dpd_cli.artifacts import run_settings
from dpd_cli.artifacts import synthetic as synthetic_file
from dpd_cli.artifacts.experts import ExpertSet, folders_under, old_preprocess_message, read_manifest, validation_record
from dpd_cli.data import Preprocess, load_dataset
from dpd_cli.data.preprocess import PREPROCESS_SCHEME
from dpd_cli.core import matching, parallel
from dpd_cli.recipes.runtime import dataset_key, derive_seed, model_spec, prepare_runtime
from dpd_cli.io.provenance import versions
from dpd_cli.core.graphs import GraphedMetaGradient
from dpd_cli.core.pruning import PruneConfig, Pruner
from dpd_cli.errors import DataError, DivergedError, ExpertsError, OutputExistsError, StorageError
from dpd_cli.events import CheckpointSaved, DistillDone, DistillIteration, DistillStarted, Message, NullSink, Sink
from dpd_cli.io.images import save_grid
from dpd_cli.models import FlatModel, ModelSpec, build_model
from dpd_cli.config.settings import DistillSettings, settings_hash

__all__ = ["DistillRecipe", "DistillState", "run", "default_run_dir", "summarize", "prune_config"]

# Settings that may change between a run and its resume.
_RESUMABLE = {"iterations", "checkpoint_every", "keep_checkpoints", "log_every", "device", "threads", "out", "experts",
              "resume", "force", "data_dir", "dist_timeout", "host_memory", "cuda_graphs",
              "keep_graphs", "deterministic"}
# Settings an experts folder decides unless the user gives them (the network, the data it saw).
_FROM_EXPERTS = ("dataset", "data_dir", "zca", "train_per_class", "val_per_class", "model", "width", "depth", "norm", "pool")
_MOMENTUM = 0.5  # SGD momentum of the images and of alpha, as MTT


def default_run_dir(s: DistillSettings) -> Path:
    return Path("runs") / f"{s.dataset}-ipc{s.ipc}-rho{s.prune_ratio:g}-s{s.seed}"


def prune_config(s: DistillSettings) -> PruneConfig:
    return PruneConfig(s.prune_ratio, s.prune_scope, s.prune_criterion, s.prune_direction, s.prune_mask, s.ema_beta, s.prune_mode)


def prune_rule(s: DistillSettings) -> dict:
    """The prune settings in force, as recorded next to the counts and in every metrics line."""
    rule = {"ratio": s.prune_ratio, "scope": s.prune_scope, "criterion": s.prune_criterion, "direction": s.prune_direction,
            "mask": s.prune_mask, "mode": s.prune_mode, "warmup": s.prune_warmup}
    if s.prune_mask == "ema":
        rule["ema_beta"] = s.ema_beta
    return rule


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
        out = {"images": self.images, "lr": self.lr, "momentum_images": self.momentum_images,
               "momentum_lr": self.momentum_lr, "prune_counts": self.prune_counts}
        if self.prune_state is not None:
            out["prune_state"] = self.prune_state.float()
        if self.label_logits is not None:
            out.update(label_logits=self.label_logits, momentum_labels=self.momentum_labels)
        return out


class DistillRecipe:
    """One distillation run: ``setup``, ``step``, ``checkpoint``, ``train``, ``close``.

    Args:
        settings: Resolved ``dpd distill`` settings. Fields the user did not set (``model_fields_set``)
            among the dataset and network settings are taken from the experts folder.
        sink: Receives progress events.
    """

    def __init__(self, settings: DistillSettings, sink: Sink | None = None):
        self.s = settings
        self.sink = sink or NullSink()
        self._stack = contextlib.ExitStack()
        self._pending: list[dict] = []  # per-iteration records not yet on disk; device tensors until flushed
        self._window_t0 = 0.0
        self.last_loss = float("nan")

    # --- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "DistillRecipe":
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the run directory's lock and the experts' files."""
        self._stack.close()

    def setup(self) -> None:
        """Find and check the experts, load the data, lock the run directory, start or resume the state.

        Under torchrun every rank sets up the same state; rank 0 alone locks, writes and reports.

        Raises:
            UserError: Missing/mismatched experts, impossible IPC, existing output, nothing to resume.
        """
        s = self.s
        self.device = prepare_runtime(s.threads, s.device, s.host_memory, s.deterministic)
        self.log_every = s.log_every or (1 if self.device.type == "cpu" else 10)
        self.group = parallel.start(self.device, s.dist_timeout)
        self._stack.callback(parallel.stop)
        self.main = self.group is None or self.group.is_main
        self.batch_grad = matching.BatchGradient() if self.group is None else parallel.ShardedGradient(self.group)
        if not self.main:
            self.sink = NullSink()
        if self.group is not None and s.norm == "batch":
            raise ExpertsError(
                "--norm batch cannot be distilled over several processes: batch norm mixes the rows that the ranks "
                "split between them, so the result would depend on the number of ranks. Use --norm instance (MTT's), "
                "or run one process."
            )
        # Cheap checks first: the experts folder is read (headers only) before any dataset is loaded.
        self.experts = self._stack.enter_context(_closing(self._open_experts()))
        s = self.s  # now with the settings adopted from the experts folder
        ds = load_dataset(s.dataset, s.data_dir, s.train_per_class, s.seed, s.val_per_class)
        self.ds = ds
        self.spec = model_spec(s, ds)
        _check_experts(self.experts, s, self.spec)
        self.pre = self.experts.preprocess
        self.run_dir = Path(s.out) if s.out else default_run_dir(s)
        if s.resume and not layout.checkpoints(self.run_dir) and not (self.run_dir / layout.SETTINGS).exists():
            raise StorageError(f"Nothing to resume in {self.run_dir}: it has no checkpoint. Run without --resume to start it.")
        self.shash = settings_hash(s, exclude=_RESUMABLE)

        self._stack.enter_context(interrupt.safe_points())
        resume = s.resume and bool(layout.checkpoints(self.run_dir))
        if self.main:
            self._stack.enter_context(storage.lock_dir(self.run_dir, "a distillation run"))
            # Temp files of a killed process; with the lock held no other process is writing here.
            storage.remove_stale_temps(self.run_dir)
            storage.remove_stale_temps(self.run_dir / layout.CHECKPOINTS)
            if s.resume and not resume:
                # Stopped before checkpoint 0 was written: every choice is seeded, so starting over is the exact resume.
                _check_recorded_settings(self.run_dir, self.shash)
                self.sink.emit(Message(f"{self.run_dir} has no checkpoint yet: starting from iteration 0."))
            _prepare_run_dir(self.run_dir, s)
        if self.group is not None:
            self.group.barrier()  # the other ranks read the run directory only once rank 0 has it in order

        torch.manual_seed(derive_seed(s.seed, "student"))
        self.fm = FlatModel(build_model(self.spec).to(self.device))
        self.sizes = [layer.numel for layer in self.fm.layers]
        self.layer_ids = self.fm.layer_ids(self.device)
        label_theta = self._label_expert() if s.soft_labels else None
        accept = None
        if s.init == "real-correct":
            accept = lambda x, c: self.fm(label_theta, x).argmax(1) == c  # noqa: E731
        images, self.labels = _init_images(s, ds, self.pre, self.device, accept)
        self.soft_info = None
        if resume:
            self.state = self._load_state(images.shape)
            if self.main:
                metrics_file.truncate(self.run_dir / layout.METRICS, self.state.iteration)
        else:
            self.state = DistillState(0, images, torch.tensor(s.lr_teacher, device=self.device), torch.zeros_like(images),
                                      torch.zeros((), device=self.device),
                                      torch.zeros(self.fm.n_params, dtype=torch.int32, device=self.device))
            if s.soft_labels:
                with torch.no_grad():
                    logits = torch.cat([self.fm(label_theta, images[i : i + 256]) for i in range(0, len(images), 256)])
                self.state.label_logits, self.state.momentum_labels = logits.float(), torch.zeros_like(logits).float()
                self.soft_info = {"expert": 0, "epoch": self._label_epoch(),
                                  "initial_accuracy": float((logits.argmax(1) == self.labels).float().mean())}
                self.sink.emit(Message(f"Soft labels: the logits of expert 0 at epoch {self.soft_info['epoch']} on the initial "
                                       f"images; it classifies {self.soft_info['initial_accuracy']:.0%} of them correctly."))
            if self.main:
                metrics_file.truncate(self.run_dir / layout.METRICS, 0)  # lines of a run stopped before checkpoint 0
                preprocess_file.save(self.run_dir / layout.PREPROCESS, self.pre)
                run_settings.save(self.run_dir, self._settings_record())
        self.pruner = Pruner(prune_config(s), self.sizes, self.state.prune_state)
        self.graphed = self._graphed()
        self.pruned_total = _layer_totals(self.state.prune_counts, self.layer_ids, len(self.sizes))
        self.iterations_pruned = sum(1 for i in range(self.state.iteration) if self._ratio_at(i) > 0)
        self.sink.emit(DistillStarted(str(self.run_dir), self.state.iteration, s.iterations,
                                      [(layer.name, layer.numel) for layer in self.fm.layers], self.fm.n_params,
                                      len(images), len(self.experts), str(self.device), s.memory, s.prune_ratio,
                                      _rule_text(s), s.keep_graphs))
        if not resume:
            self.checkpoint()  # checkpoint 0: the real images the run starts from, always kept

    # --- one iteration --------------------------------------------------------------------------
    def step(self) -> None:
        """Run iteration ``state.iteration``: unroll, mask, meta-gradient, update images and alpha."""
        s, st = self.s, self.state
        it = st.iteration
        rng = random.Random(derive_seed(s.seed, "iteration", it))
        e = rng.randrange(len(self.experts))
        t = rng.randrange(s.max_start_epoch)
        start, target = (_to_device(v, self.device) for v in self.experts.pair(e, t, s.expert_epochs))
        plan = _plan(rng, len(st.images), s, self.device)
        ratio = self._ratio_at(it)
        if self.graphed is not None and self.graphed.enabled:  # stateless prune settings only: no unroll mask
            res, note = self.graphed(start, target, plan, ratio)
            if note:
                self.sink.emit(Message(note, "warning"))
        else:
            unroll_keep = self.pruner.unroll_keep(ratio)
            res = matching.meta_gradient(self.fm, st.images, self.labels, st.lr, start, target, plan, s.memory,
                                         loss_mask=self.pruner.loss_mask(ratio, unroll_keep), unroll_keep=unroll_keep,
                                         batch_grad=self.batch_grad, label_logits=st.label_logits, keep_graphs=s.keep_graphs)
        self.pruner.commit()
        with torch.no_grad():
            # SGD with momentum 0.5 (PyTorch semantics: buf = m * buf + g; p -= lr * buf).
            st.momentum_images.mul_(_MOMENTUM).add_(res.grad_images)
            st.images.sub_(s.lr_img * st.momentum_images)
            st.momentum_lr.mul_(_MOMENTUM).add_(res.grad_lr)
            st.lr.sub_(s.lr_lr * st.momentum_lr)
            if st.label_logits is not None:  # DATM: SGD with its own learning rate and momentum
                st.momentum_labels.mul_(s.momentum_y).add_(res.grad_labels)
                st.label_logits.sub_(s.lr_y * st.momentum_labels)
            if res.keep is None:
                pruned = torch.zeros(len(self.sizes), device=self.device)
            else:
                dropped = (~res.keep).to(torch.int32)
                st.prune_counts.add_(dropped)
                pruned = torch.zeros(len(self.sizes), device=self.device).index_add_(0, self.layer_ids, dropped.float())
        st.prune_state = self.pruner.state
        st.iteration = it + 1
        self._pending.append({"iteration": it + 1, "loss": res.loss.float(), "lr": st.lr.clone(), "pruned": pruned,
                              "expert": e, "start_epoch": t})

    def _graphed(self) -> GraphedMetaGradient | None:
        """The CUDA-graph runner (``--cuda-graphs``, on a GPU), or ``None`` with a message saying why not."""
        s = self.s
        if self.device.type != "cuda" or not s.cuda_graphs:
            return None
        st = self.state
        why = ("under torchrun" if self.group is not None else
               "--prune-mask ema and --prune-mode network carry state across iterations" if self.pruner.keeps_state else None)
        if why:
            self.sink.emit(Message(f"CUDA graphs not used ({why}); each iteration runs eagerly."))
            return None
        n = len(st.images)
        batch = s.batch_syn if s.batch_syn and s.batch_syn < n else None
        return GraphedMetaGradient(self.fm, st.images, self.labels, st.lr, s.memory, s.syn_steps, batch, s.dsa,
                                   self.pruner.loss_mask, label_logits=st.label_logits, keep_graphs=s.keep_graphs)

    def _stop_requested(self) -> bool:
        """A stop request (Ctrl-C, SIGTERM) on any rank stops every rank at the same iteration."""
        if self.group is None:
            return interrupt.requested()
        return self.group.any(interrupt.requested(), self.device)

    def _ratio_at(self, it: int) -> float:
        return 0.0 if it < self.s.prune_warmup else self.s.prune_ratio

    # --- outputs --------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write the pending iterations' metrics (one host sync for the window) and emit their events.

        Every rank checks for divergence (all hold the same values); rank 0 alone writes.

        Raises:
            DivergedError: A loss became NaN/Inf or alpha non-positive.
        """
        if not self._pending:
            return
        s, pending = self.s, self._pending
        losses = torch.stack([p["loss"] for p in pending]).tolist()
        lrs = torch.stack([p["lr"] for p in pending]).tolist()
        pruned = torch.stack([p["pruned"] for p in pending]).round().long().tolist()
        dt = (time.perf_counter() - self._window_t0) / len(pending)
        rule = _rule_text(s) if s.prune_ratio > 0 else None
        records = []
        for p, loss, a, pr in zip(pending, losses, lrs, pruned, strict=True):
            if not (loss == loss and abs(loss) != float("inf")) or not (a > 0 and a == a):
                raise self._diverged(p["iteration"], loss, a)
            if sum(pr):
                self.iterations_pruned += 1
            self.pruned_total = [a_ + b_ for a_, b_ in zip(self.pruned_total, pr, strict=True)]
            rec = {"iteration": p["iteration"], "loss": loss, "lr": a, "expert": p["expert"], "start_epoch": p["start_epoch"],
                   "pruned": {layer.name: c for layer, c in zip(self.fm.layers, pr, strict=True)},
                   "pruned_fraction": sum(pr) / self.fm.n_params, "seconds": dt}
            if rule:
                rec["prune_rule"] = rule
            records.append(rec)
            self.sink.emit(DistillIteration(p["iteration"], s.iterations, loss, a, p["start_epoch"], pr, list(self.pruned_total),
                                            self.iterations_pruned, dt))
            self.last_loss = loss
        if self.main:
            metrics_file.append(self.run_dir / layout.METRICS, records)
        self._pending = []
        self._window_t0 = time.perf_counter()

    def _diverged(self, iteration: int, loss: float, a: float) -> DivergedError:
        last = layout.checkpoints(self.run_dir)
        kept = f"the last good checkpoint ({last[0].name}) is kept" if last else "no checkpoint was written yet"
        what = f"loss became {loss}" if not (loss == loss and abs(loss) != float("inf")) else f"the learning rate alpha became {a}"
        how = "rerun with --resume to continue from that checkpoint, or --force to start over" if last else "rerun with --force"
        return DivergedError(f"Distillation diverged at iteration {iteration}: {what}; {kept}. Lower --lr-img or --lr-lr "
                             f"(or --lr-teacher), then {how}.")

    def checkpoint(self) -> Path:
        """Flush the metrics, write the checkpoint of the current iteration and refresh the outputs (rank 0)."""
        self.flush()
        s, st = self.s, self.state
        path = layout.checkpoint_path(self.run_dir, st.iteration)
        if not self.main:
            return path
        meta = self._meta(st.iteration)
        synthetic_file.save_checkpoint(path, {**st.tensors(), "labels": self.labels}, self.pre, meta)
        kept = {layout.checkpoint_iteration(p): p for p in layout.checkpoints(self.run_dir)}
        for it in layout.checkpoints_to_delete(list(kept), s.keep_checkpoints, s.checkpoint_every):
            kept[it].unlink(missing_ok=True)
        synthetic_file.save_synthetic(self.run_dir / layout.SYNTHETIC, st.images, self.labels, st.lr, self.pre, meta,
                                      st.label_logits)
        prune_file.save(self.run_dir / layout.PRUNE, st.prune_counts, self.fm.layout, self.iterations_pruned, st.iteration,
                        prune_rule(s))
        save_grid(self.pre.invert(st.images), self.labels, self.ds.n_classes, self.run_dir / layout.GRID)
        self.sink.emit(CheckpointSaved(st.iteration, str(path)))
        return path

    def train(self) -> Path:
        """Iterate until ``--iterations``, checkpointing every ``--checkpoint-every`` and on a stop request.

        Returns:
            The run directory.

        Raises:
            Interrupted: A stop was requested; a checkpoint was written first.
            DivergedError: See ``flush``.
        """
        s = self.s
        t_run = time.perf_counter()
        self._window_t0 = t_run
        while self.state.iteration < s.iterations:
            if self._stop_requested():
                self.checkpoint()
                raise interrupt.Interrupted(
                    f"stopped after iteration {self.state.iteration}; rerun the same command with --resume to continue {self.run_dir}")
            self.step()
            if len(self._pending) >= self.log_every:
                self.flush()
            if self.state.iteration % s.checkpoint_every == 0 and self.state.iteration < s.iterations:
                self.checkpoint()
        self.checkpoint()
        self.sink.emit(DistillDone(str(self.run_dir), s.iterations, self.last_loss, float(self.state.lr), time.perf_counter() - t_run))
        return self.run_dir

    # --- helpers ----------------------------------------------------------------------------------
    def _open_experts(self) -> ExpertSet:
        """The experts folder, and the settings it decides that the user did not give."""
        s = self.s
        folder = Path(s.experts) if s.experts else _choose_experts_folder(s, self.sink)
        experts = ExpertSet(folder)
        given = s.model_fields_set
        recorded = experts.manifest.get("settings") or {}
        adopted = {k: recorded[k] for k in _FROM_EXPERTS if k not in given and k in recorded}
        spec = experts.spec
        adopted.update({k: getattr(spec, k) for k in ("width", "depth", "norm", "pool") if k not in given})
        if "model" not in given:
            adopted["model"] = spec.name
        if adopted:
            self.s = type(s).model_validate({**{k: getattr(s, k) for k in given}, **adopted})
        _check_experts_before_data(experts, self.s)
        return experts

    def _settings_record(self) -> dict:
        s = self.s
        return {
            "command": "distill",
            "settings": s.model_dump(mode="json"),
            "settings_hash": self.shash,
            "experts_folder": str(self.experts.folder.resolve()),
            "n_experts": len(self.experts),
            "model": self.spec.to_dict(),
            "validation": validation_record(self.ds),
            "soft_labels": self.soft_info,
            "versions": versions(),
        }

    def _meta(self, iteration: int) -> dict:
        s, ds = self.s, self.ds
        return {
            "dataset": ds.name,
            "classes": ds.classes,
            "model": self.spec.to_dict(),
            "iteration": iteration,
            "iterations": s.iterations,
            "ipc": s.ipc,
            "zca": s.zca,
            "settings": s.model_dump(mode="json"),
            "settings_hash": self.shash,
            "experts_folder": str(self.experts.folder.resolve()),
            "preprocess_fingerprint": self.pre.fingerprint(),
            "validation": None if ds.val_indices is None else {"per_class": s.val_per_class, "fingerprint": ds.val_fingerprint},
            "prune_rule": prune_rule(s),
            "soft_labels": self.soft_info,
            "versions": versions(),
        }

    def _label_epoch(self) -> int:
        return self.experts.epochs if self.s.label_epoch is None else self.s.label_epoch

    def _label_expert(self) -> torch.Tensor:
        """The parameters (expert 0 at --label-epoch) whose logits initialise the soft labels."""
        epoch = self._label_epoch()
        if epoch > self.experts.epochs:
            raise ExpertsError(f"--label-epoch {epoch}: the experts in {self.experts.folder} have epochs 0..{self.experts.epochs}.")
        return self.experts.files[0].rows("trajectory", [epoch])[0].to(self.device)

    def _load_state(self, image_shape) -> DistillState:
        errors = []
        for path in layout.checkpoints(self.run_dir):
            try:
                t, meta = synthetic_file.load(path)
            except StorageError as e:
                errors.append(str(e))
                continue
            if ("label_logits" in t) != self.s.soft_labels:
                has = "soft labels" if "label_logits" in t else "hard labels"
                raise OutputExistsError(
                    f"{self.run_dir} was distilled with {has}; --soft-labels cannot be switched "
                    f"{'off' if 'label_logits' in t else 'on'} on --resume. Resume with the run's own setting, or start "
                    "over with --force (or another --out)."
                )
            if meta.get("settings_hash") != self.shash:
                raise _other_settings(self.run_dir)
            if tuple(t["images"].shape) != tuple(image_shape):
                raise StorageError(f"{path}: images have shape {tuple(t['images'].shape)}, expected {tuple(image_shape)}.")
            if t["prune_counts"].numel() != self.fm.n_params:
                raise StorageError(f"{path}: prune counts for {t['prune_counts'].numel()} parameters, the model has "
                                   f"{self.fm.n_params}. Start over with --force.")
            iteration = int(meta["iteration"])
            if iteration > self.s.iterations:
                raise OutputExistsError(
                    f"{self.run_dir} has a checkpoint at iteration {iteration}, past --iterations {self.s.iterations}: resuming "
                    f"would label that later state as iteration {self.s.iterations}. Resume with --iterations {iteration} or more, "
                    "evaluate an earlier checkpoint directly (dpd evaluate RUN/checkpoints/ckpt-NNNNNN.safetensors), or use --force to start over."
                )
            dev = self.device
            opt = lambda k: None if k not in t else t[k].to(dev)  # noqa: E731
            self.soft_info = meta.get("soft_labels")
            return DistillState(iteration, t["images"].to(dev), t["lr"].to(dev), t["momentum_images"].to(dev),
                                t["momentum_lr"].to(dev), t["prune_counts"].to(dev), opt("prune_state"),
                                opt("label_logits"), opt("momentum_labels"))
        raise StorageError(f"No loadable checkpoint in {self.run_dir / layout.CHECKPOINTS}: {' '.join(errors)} Start over with --force.")


def run(settings: DistillSettings, sink: Sink | None = None) -> Path:
    """Distil a synthetic set; resumable, deterministic under ``settings.seed``.

    Returns:
        The run directory.

    Raises:
        UserError: Missing/mismatched experts, impossible IPC, existing output, divergence.
        Interrupted: A stop was requested; a checkpoint was written first.
    """
    with DistillRecipe(settings, sink) as recipe:
        return recipe.train()


@contextlib.contextmanager
def _closing(experts: ExpertSet):
    try:
        yield experts
    finally:
        close = getattr(experts, "close", None)
        if close is not None:
            close()


def _rule_text(s: DistillSettings) -> str:
    """``global/abs/largest/step/loss`` (``ema0.9`` for the EMA mask): which parameters are pruned, and how."""
    mask = f"ema{s.ema_beta:g}" if s.prune_mask == "ema" else "step"
    return f"{s.prune_scope}/{s.prune_criterion}/{s.prune_direction}/{mask}/{s.prune_mode}"


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
            manifest = read_manifest(folder)
            compat, recorded = manifest["compat"], manifest.get("settings") or {}
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
        candidates.append((folder, recorded))
    if not candidates:
        others = folders_under(root)
        if not others:
            raise ExpertsError(
                f"No experts found in the experts root {root} (set by DPD_EXPERTS_ROOT). Train them first with `dpd experts` "
                "(same --dataset, --model, --width, --zca), or pass --experts pointing at an experts folder."
            )
        wanted = ", ".join(f"{k} {getattr(s, k)}" for k in ("dataset", "model", "width", "depth", "norm", "pool", "zca",
                                                             "train_per_class", "val_per_class") if k in given)
        raise ExpertsError(
            f"None of the experts folders under {root} fits these settings ({wanted}): "
            + ", ".join(str(p) for p in others[:8]) + ("..." if len(others) > 8 else "")
            + ". Train matching experts first with `dpd experts`, leave those settings out, or pass --experts."
        )
    folder = candidates[0][0]
    more = f"the newest of {len(candidates)} matching folders; " if len(candidates) > 1 else ""
    sink.emit(Message(f"Using experts {folder} ({more}pass --experts to choose another)."))
    return folder


def _check_experts_before_data(experts: ExpertSet, s: DistillSettings) -> None:
    """What can be checked from the manifest alone, before any dataset is loaded."""
    if experts.preprocess_scheme != PREPROCESS_SCHEME:
        raise ExpertsError(old_preprocess_message(experts.folder, experts.compat))
    diffs = []
    for key, want in (("dataset", dataset_key(s)), ("zca", s.zca), ("val_per_class", s.val_per_class)):
        if experts.compat.get(key) != want:
            diffs.append(f"{key}: experts have {experts.compat.get(key)!r}, settings give {want!r}")
    if diffs:
        raise ExpertsError(
            f"The experts in {experts.folder} do not fit these settings ({'; '.join(diffs)}). Leave those settings out "
            "to use the experts' own, or train matching experts with `dpd experts`."
        )


def _check_experts(experts: ExpertSet, s: DistillSettings, spec: ModelSpec) -> None:
    found_spec = experts.spec.to_dict()
    diffs = [f"{k}: experts have {found_spec.get(k)!r}, settings give {v!r}" for k, v in spec.to_dict().items() if found_spec.get(k) != v]
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


def _init_images(s: DistillSettings, ds, pre: Preprocess, device, accept=None) -> tuple[torch.Tensor, torch.Tensor]:
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
    """Refuse an existing run unless --resume (its files are this run's: the settings hash was checked) or --force."""
    existing = [f for f in layout.RUN_FILES if (run_dir / f).exists()]
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
    evaluation.partial_path(run_dir / layout.EVAL).unlink(missing_ok=True)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU -> device without a stream sync: copies from pinned memory are truly asynchronous."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _layer_totals(prune_counts: torch.Tensor, layer_ids: torch.Tensor, n_layers: int) -> list[int]:
    totals = torch.zeros(n_layers, dtype=torch.int64, device=prune_counts.device).index_add_(0, layer_ids, prune_counts.long())
    return [int(v) for v in totals.tolist()]


def _other_settings(run_dir: Path) -> OutputExistsError:
    return OutputExistsError(
        f"{run_dir} was started with other settings (the run's settings.json has them). Resume with the same "
        "settings (only --iterations, --checkpoint-every, --keep-checkpoints, --log-every, --device, --threads, --experts, "
        "--data-dir may change), or use --force to start over."
    )


def _check_recorded_settings(run_dir: Path, shash: str) -> None:
    """Refuse to resume a checkpoint-less run whose settings.json records other settings."""
    try:
        recorded = run_settings.load(run_dir).get("settings_hash")
    except StorageError as e:
        raise StorageError(f"{e} There is no checkpoint to resume: start over with --force.") from e
    if recorded != shash:
        raise _other_settings(run_dir)


def summarize(run_dir: Path) -> dict:
    """A short description of a finished or partial run, from its files."""
    run_dir = Path(run_dir)
    t, meta = synthetic_file.load(run_dir / layout.SYNTHETIC)
    return {
        "run_dir": str(run_dir),
        "synthetic": str(run_dir / layout.SYNTHETIC),
        "dataset": meta["dataset"],
        "n_images": len(t["labels"]),
        "ipc": meta.get("ipc"),
        "iteration": meta.get("iteration"),
        "iterations": meta.get("iterations"),
        "lr": float(t["lr"]),
    }
