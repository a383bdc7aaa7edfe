"""``dpd distill``: the distillation loop, one recipe object around ``matching.meta_gradient``.

``DistillRecipe`` is what the CLI, the tests and the benchmarks all drive::

    with DistillRecipe(settings, sink) as recipe:   # setup(): experts, data, run dir, state (fresh or resumed)
        recipe.step()                               # one iteration
        recipe.checkpoint()                         # exact-resume state + outputs
        run_dir = recipe.train()                    # steps until done, with checkpoints and Ctrl-C handling

The state that must survive a resume lives in one ``DistillState`` (``distill_inputs``); a checkpoint holds it.
Everything random in iteration ``i`` is derived from ``(seed, i)``, so a resume reproduces an
uninterrupted run exactly on the same device. ``RunWriter`` writes the run directory.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from functools import partial
from pathlib import Path

import torch

from dpd_cli import interrupt
from dpd_cli.artifacts import layout, run_settings
from dpd_cli.artifacts import synthetic as synthetic_file
from dpd_cli.artifacts.experts import validation_record
from dpd_cli.artifacts.run_writer import RunWriter
from dpd_cli.config.settings import DistillSettings, settings_hash
from dpd_cli.core import matching, parallel
from dpd_cli.core.graphs import GraphedMetaGradient
from dpd_cli.core.pruning import PruneConfig, Pruner
from dpd_cli.data import load_dataset
from dpd_cli.errors import ExpertsError, StorageError
from dpd_cli.events import CheckpointSaved, DistillIteration, DistillStarted, Message, NullSink, Sink
from dpd_cli.io import storage
from dpd_cli.io.provenance import versions
from dpd_cli.models import FlatModel, build_model
from dpd_cli.recipes import batch
from dpd_cli.recipes import distill_inputs as inputs
from dpd_cli.recipes.distill_inputs import ADJUSTABLE, RESUMABLE, DistillState
from dpd_cli.recipes.runtime import derive_seed, model_spec, prepare_runtime
from dpd_cli.recipes.step_watch import StepWatch

__all__ = ["DistillRecipe", "run", "existing"]

_MOMENTUM = 0.5  # SGD momentum of the images and of alpha, as MTT


def existing(settings: DistillSettings) -> tuple[Path, str]:
    """The run directory a run of ``settings`` writes and what it holds: ``"none"``, ``"finished"`` (a complete
    synthetic set distilled with these settings) or ``"started"`` (anything else: ``--resume`` continues it,
    or says why it cannot)."""
    s, _ = inputs.with_experts_sources(settings)
    run_dir = DistillRecipe.run_dir_for(s)
    if not (run_dir / layout.SETTINGS).exists() and not layout.checkpoints(run_dir):
        return run_dir, "none"
    try:
        _, meta = synthetic_file.load(run_dir / layout.SYNTHETIC)
    except StorageError:
        return run_dir, "started"
    same = meta.get("settings_hash") == settings_hash(s, exclude=set(RESUMABLE))
    return run_dir, "finished" if same and meta.get("iteration", -1) >= s.iterations else "started"


class DistillRecipe:
    """One distillation run: ``setup``, ``step``, ``checkpoint``, ``train``, ``close``. The dataset and network
    settings the user did not give are taken from the experts folder first (``with_experts``)."""

    def __init__(self, settings: DistillSettings, sink: Sink | None = None):
        rank, _ = parallel.world_from_env()
        self.sink = sink if sink is not None and rank == 0 else NullSink()  # under torchrun rank 0 alone reports
        self._stack = contextlib.ExitStack()
        self.s, self.experts = inputs.with_experts(settings, self.sink)
        self._stack.callback(self.experts.close)
        self.prune = PruneConfig.from_settings(self.s)
        self._pending: list[dict] = []  # per-iteration records not yet on disk; device tensors until flushed
        self._window_t0 = 0.0
        self.last_loss = float("nan")
        self.changed: dict = {}  # ADJUSTABLE settings this resume changed, for the next metrics line
        self.in_batch = False  # one of a batch's runs: BatchRecipe steps it
        self.run_dir = self.run_dir_for(self.s)

    @staticmethod
    def run_dir_for(s: DistillSettings) -> Path:
        """``--out``, or by default named after dataset, IPC, prune ratio and seed."""
        return Path(s.out) if s.out else Path("runs") / f"{s.dataset}-ipc{s.ipc}-rho{s.prune_ratio:g}-s{s.seed}"

    def __enter__(self) -> DistillRecipe:
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
        """Check the experts, load the data, lock the run directory, start or resume the state (raises
        ``UserError``). Under torchrun every rank sets up the same state; rank 0 alone locks, writes and reports."""
        self._setup_runtime()
        self._setup_data()
        resume = self._setup_run_dir()
        self._setup_state(resume)
        self.pruner = Pruner(self.prune, self.sizes, self.state.prune_state)
        self.graphed = self._graphed()
        self.pruned_total = inputs.layer_totals(self.state.prune_counts, self.layer_ids, len(self.sizes))
        self.iterations_pruned = sum(1 for i in range(self.state.iteration) if self.prune.ratio_at(i) > 0)
        s, layers = self.s, [(layer.name, layer.numel) for layer in self.fm.layers]
        self.sink.emit(
            DistillStarted(
                **{"run_dir": str(self.run_dir), "start_iteration": self.state.iteration, "iterations": s.iterations},
                **{"layers": layers, "n_params": self.fm.n_params, "n_images": len(self.state.images)},
                **{"n_experts": len(self.experts), "device": str(self.device), "memory": s.memory},
                **{"prune_ratio": s.prune_ratio, "prune_rule": self.prune.text(), "keep_graphs": s.keep_graphs},
            )
        )
        if not resume:
            self.checkpoint()  # checkpoint 0: the real images the run starts from, always kept

    def _setup_runtime(self) -> None:
        """Threads, device, the process group under torchrun, and how a mini-batch's gradient is computed."""
        s = self.s
        self.device = prepare_runtime(s.threads, s.device, s.deterministic)
        self.log_every = s.log_every or (1 if self.device.type == "cpu" else 10)
        self.group = parallel.start(self.device, s.dist_timeout)
        self._stack.callback(parallel.stop)
        self.main = self.group is None or self.group.is_main
        if self.group is not None and s.norm == "batch":
            raise ExpertsError(inputs.NORM_BATCH_RANKS)
        self.batch_grad = matching.BatchGradient() if self.group is None else parallel.ShardedGradient(self.group)

    def _setup_data(self) -> None:
        """The dataset and the network the experts were trained on."""
        s = self.s
        self.ds = load_dataset(s.dataset, s.data_dir, s.train_per_class, s.seed, s.val_per_class)
        inputs.check_data(s, self.ds)
        self.spec = model_spec(s, self.ds)
        inputs.check_experts(self.experts, s, self.spec)
        self.pre = self.experts.preprocess

    def _setup_run_dir(self) -> bool:
        """Lock the run directory and refuse what must not be overwritten; True when resuming from a checkpoint."""
        s = self.s
        self.writer = RunWriter(self.run_dir, self.pre, writes=self.main)
        if s.resume and not self.writer.checkpoints() and not (self.run_dir / layout.SETTINGS).exists():
            raise StorageError(
                f"Nothing to resume in {self.run_dir}: it has no checkpoint. Run without --resume to start it."
            )
        # A resume may change ADJUSTABLE settings: the run's hash is that of the values it started with.
        started = ((run_settings.read(self.run_dir)[0] or {}).get("settings") or {}) if s.resume else {}
        base = s.model_copy(update={k: started[k] for k in ADJUSTABLE if k in started})
        self.shash = settings_hash(base, exclude=set(RESUMABLE))
        self._stack.enter_context(interrupt.safe_points())
        self.aside, self.reached = [], 0  # damaged checkpoints moved aside; the iteration the run had reached
        if self.main:
            self._stack.enter_context(storage.removed_if_unused(self.run_dir))  # released after the lock
            self.writer.lock(self._stack)
            if s.resume:
                self.aside, self.reached = self.writer.set_aside_damaged(), self.writer.reached()
                self.reached = max([self.reached, *(layout.checkpoint_iteration(p) for p, _, _ in self.aside)])
            if s.resume and not self.writer.checkpoints():
                # Stopped before checkpoint 0 was written, or every checkpoint is damaged: every choice is seeded,
                # so starting over is the exact resume.
                if self.writer.recorded_settings_hash() != self.shash:
                    raise inputs.other_settings(self.run_dir, s)
                self.shash = settings_hash(s, exclude=set(RESUMABLE))  # started again: with these values
                self.sink.emit(inputs.resume_message(self.run_dir, self.aside, None, self.reached))
            self.writer.prepare(s.resume, s.force)
        if self.group is not None:
            self.group.barrier()  # the other ranks read the run directory only once rank 0 has it in order
        return s.resume and bool(self.writer.checkpoints())

    def _setup_state(self, resume: bool) -> None:
        """The student network, the labels and the state: resumed from the newest checkpoint, or fresh."""
        s = self.s
        torch.manual_seed(derive_seed(s.seed, "student"))
        self.fm = FlatModel(build_model(self.spec).to(self.device))
        self.sizes = [layer.numel for layer in self.fm.layers]
        self.layer_ids = self.fm.layer_ids(self.device)
        label_theta = inputs.label_expert(s, self.experts, self.device) if s.soft_labels else None
        accept = None
        if s.init == "real-correct":
            accept = lambda x, c: self.fm(label_theta, x).argmax(1) == c  # noqa: E731
        images, self.labels = inputs.init_images(s, self.ds, self.pre, self.device, accept)
        self.watch = StepWatch(float(images.std()))
        self.soft_info = None
        if resume:
            self.state = self._load_state(images.shape)
            self.writer.resumed(self.state.iteration)
            return
        zero = torch.zeros((), device=self.device)
        counts = torch.zeros(self.fm.n_params, dtype=torch.int32, device=self.device)
        lr = torch.tensor(s.lr_teacher, device=self.device)
        self.state = DistillState(0, images, lr, torch.zeros_like(images), zero, counts)
        if s.soft_labels:
            logits, self.soft_info = inputs.initial_soft_labels(
                self.fm, label_theta, images, self.labels, s, self.experts
            )
            self.state.label_logits, self.state.momentum_labels = logits, torch.zeros_like(logits)
            self.sink.emit(
                Message(
                    f"Soft labels: the logits of expert 0 at epoch {self.soft_info['epoch']} on the "
                    f"initial images; it classifies {self.soft_info['initial_accuracy']:.0%} of them correctly."
                )
            )
        self.writer.start(self._record("settings"))

    # --- one iteration --------------------------------------------------------------------------
    def step(self) -> None:
        """Run iteration ``state.iteration``: unroll, mask, meta-gradient, update images and alpha."""
        it, e, t, start, target, plan = self.draw()
        self.update(self._meta_gradient(start, target, plan, self.prune.ratio_at(it)), e, t)

    def draw(self) -> tuple[int, int, int, torch.Tensor, torch.Tensor, matching.StepPlan]:
        """Iteration ``state.iteration``'s random choices, all from ``(seed, iteration)``: the iteration, the
        expert e, the start epoch t, theta*_t and theta*_{t+M} of expert e, and the unroll's plan."""
        s, st = self.s, self.state
        it = st.iteration
        rng = random.Random(derive_seed(s.seed, "iteration", it))
        e = rng.randrange(len(self.experts))
        t = rng.randrange(s.max_start_epoch)
        start, target = (inputs.to_device(v, self.device) for v in self.experts.pair(e, t, s.expert_epochs))
        return it, e, t, start, target, inputs.draw_plan(rng, len(st.images), s, self.device)

    def update(self, res: matching.MetaResult, e: int, t: int) -> None:
        """Apply the iteration's meta-gradient (from expert e, start epoch t): SGD on the images, alpha and
        the label logits, the prune counts and state, and the iteration's record."""
        s, st = self.s, self.state
        it = st.iteration
        self.pruner.commit()
        with torch.no_grad():
            grad, lr_img, grad_norm = inputs.image_step(s, it, res.grad_images)
            _sgd_(st.images, st.momentum_images, grad, lr_img, _MOMENTUM)
            _sgd_(st.lr, st.momentum_lr, res.grad_lr, s.lr_lr, _MOMENTUM)
            if st.label_logits is not None:  # DATM: SGD with its own learning rate and momentum
                _sgd_(st.label_logits, st.momentum_labels, res.grad_labels, s.lr_y, s.momentum_y)
            pruned = torch.zeros(len(self.sizes), device=self.device)  # per layer, this iteration
            if res.keep is not None:
                dropped = (~res.keep).to(torch.int32)
                st.prune_counts.add_(dropped)
                pruned.index_add_(0, self.layer_ids, dropped.float())
            image_std = st.images.std().float()  # on the device: read with the loss, in flush()
        st.prune_state = self.pruner.state
        st.iteration = it + 1
        record = {"iteration": it + 1, "loss": res.loss.float(), "lr": st.lr.clone(), "pruned": pruned, "expert": e}
        self._pending.append({**record, "start_epoch": t, "image_std": image_std, "grad_norm": grad_norm})

    def _meta_gradient(self, start, target, plan: matching.StepPlan, ratio: float) -> matching.MetaResult:
        """The iteration's meta-gradient: replayed from a CUDA graph where one was captured, else computed eagerly."""
        if self.graphed is not None and self.graphed.enabled:  # stateless prune settings only: no unroll mask
            res, note = self.graphed(start, target, plan, ratio)
            if note:
                self.sink.emit(Message(note, "warning"))
            return res
        options = {"memory": self.s.memory, "keep_graphs": self.s.keep_graphs, "batch_grad": self.batch_grad}
        return matching.meta_gradient(self.fm, start=start, target=target, plan=plan, **options, **self.problem(ratio))

    def problem(self, ratio: float) -> dict:
        """This run's own arguments of ``meta_gradient`` at prune ratio ``ratio``: images, labels, alpha, the label
        logits, the loss mask and the parameters that move in the unroll."""
        st, keep = self.state, self.pruner.unroll_keep(ratio)
        own = {"images": st.images, "labels": self.labels, "lr": st.lr, "label_logits": st.label_logits}
        return {**own, "loss_mask": self.pruner.loss_mask(ratio, keep), "unroll_keep": keep}

    def _graphed(self) -> GraphedMetaGradient | None:
        """The CUDA-graph runner (``--cuda-graphs``, on a GPU), or ``None`` with a message saying why not."""
        why_not, st = inputs.cuda_graphs(self.s, self.device, self.group, self.pruner, self.in_batch), self.state
        if why_not:
            self.sink.emit(Message(f"CUDA graphs not used ({why_not}); each iteration runs eagerly."))
        if why_not is not None:
            return None
        options = inputs.graph_options(self.s, st)
        return GraphedMetaGradient(self.fm, st.images, self.labels, st.lr, mask_for=self.pruner.loss_mask, **options)

    def _stop_requested(self) -> bool:
        """A stop request (Ctrl-C, SIGTERM) on any rank stops every rank at the same iteration."""
        if self.group is None:
            return interrupt.requested()
        return self.group.any(interrupt.requested(), self.device)

    # --- outputs --------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write the pending iterations' metrics (one host sync for the window) and emit their events; every
        rank raises ``DivergedError`` for a NaN/Inf loss or a non-positive alpha (all hold the same values)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        dt = (time.perf_counter() - self._window_t0) / len(pending)
        keys = ("loss", "lr", "image_std", "grad_norm")  # read in one host sync
        values = torch.stack([torch.stack([p[k].float() for k in keys]) for p in pending]).tolist()
        per_layer = torch.stack([p["pruned"] for p in pending]).round().long().tolist()
        records = []
        for p, (loss, a, image_std, grad_norm), pruned in zip(pending, values, per_layer, strict=True):
            if not math.isfinite(loss) or not a > 0:  # a NaN alpha fails "> 0" too
                raise inputs.diverged(p["iteration"], loss, a, self.writer.checkpoints())
            for text in self.watch.check(p["iteration"], loss, image_std, self.s.lr_img):
                self.sink.emit(Message(text, "warning"))
            self.iterations_pruned += bool(sum(pruned))
            self.pruned_total = [a_ + b_ for a_, b_ in zip(self.pruned_total, pruned, strict=True)]
            layers = {layer.name: c for layer, c in zip(self.fm.layers, pruned, strict=True)}
            rec = {**p, "loss": loss, "lr": a, "image_std": image_std, "grad_norm": grad_norm, "pruned": layers}
            rec["pruned_fraction"] = sum(pruned) / self.fm.n_params
            if self.changed:
                rec["changed"], self.changed = self.changed, {}
            records.append(
                {**rec, "seconds": dt} | ({"prune_rule": self.prune.text()} if self.s.prune_ratio > 0 else {})
            )
            n_pruned, total = self.iterations_pruned, list(self.pruned_total)
            event = (p["iteration"], self.s.iterations, loss, a, p["start_epoch"], pruned, total, n_pruned, dt)
            self.sink.emit(DistillIteration(*event))
            self.last_loss = loss
        self.writer.metrics(records)
        self._window_t0 = time.perf_counter()

    def checkpoint(self) -> Path:
        """Flush the metrics, write the checkpoint of the current iteration and refresh the outputs (rank 0)."""
        self.flush()
        st = self.state
        path = self.writer.save(
            self._record(st.iteration), {**st.tensors(), "labels": self.labels}, self.fm.layout, self.iterations_pruned
        )
        if self.main:
            self.sink.emit(CheckpointSaved(st.iteration, str(path)))
        return path

    def train(self) -> Path:
        """Iterate until ``--iterations``, checkpointing every ``--checkpoint-every`` and, before raising
        ``Interrupted``, on a stop request; returns the run directory."""
        return batch.train(lambda live: self.step(), [self])[0]

    def _record(self, iteration: int | str) -> dict:
        """What ``settings.json`` (``iteration="settings"``) or the files of an iteration record about the run."""
        s, ds = self.s, self.ds
        record = {
            "settings": s.model_dump(mode="json"),
            "settings_hash": self.shash,
            "model": self.spec.to_dict(),
            "experts_folder": str(self.experts.folder.resolve()),
            "soft_labels": self.soft_info,
        }
        if iteration == "settings":
            extra = {"n_experts": len(self.experts), "validation": validation_record(ds)}
            return {"command": "distill", **record, **extra, "versions": versions()}
        val = None if ds.val_indices is None else {"per_class": s.val_per_class, "fingerprint": ds.val_fingerprint}
        head = {"dataset": ds.name, "classes": ds.classes, "iteration": iteration, "iterations": s.iterations}
        tail = {"preprocess_fingerprint": self.pre.fingerprint(), "validation": val, "prune_rule": self.prune.rule()}
        rest = {"warnings": self.watch.warnings, "versions": versions()}
        return {**head, "ipc": s.ipc, "zca": s.zca, **record, **tail, **rest}

    def _load_state(self, image_shape) -> DistillState:
        s = self.s
        check = partial(inputs.check_resumable, self.run_dir, s, self.shash, tuple(image_shape), self.fm.n_params)
        t, meta = self.writer.newest_state(check)
        it, before = int(meta["iteration"]), meta.get("settings") or {}
        self.sink.emit(inputs.resume_message(self.run_dir, self.aside, it, self.reached))
        now = s.model_dump(mode="json")
        self.changed = {k: {"from": before[k], "to": now[k]} for k in ADJUSTABLE if before.get(k, now[k]) != now[k]}
        for k, c in self.changed.items():
            flag = f"--{k.replace('_', '-')}"
            self.sink.emit(Message(f"{flag} changes from {c['from']:g} to {c['to']:g} after iteration {it}."))
        self.writer.record_changes(it, self.changed)
        self.soft_info = meta.get("soft_labels")
        self.watch.warnings = list(meta.get("warnings") or [])
        opt = {k: t[k].to(self.device) for k in ("prune_state", "label_logits", "momentum_labels") if k in t}
        fixed = [t[k].to(self.device) for k in ("images", "lr", "momentum_images", "momentum_lr", "prune_counts")]
        return DistillState(int(meta["iteration"]), *fixed, **opt)


def run(settings: DistillSettings, sink: Sink | None = None) -> Path | list[Path]:
    """Distil a synthetic set; resumable, deterministic under ``settings.seed``. With ``settings.seeds`` one
    run per seed, as one computation (``batch.BatchRecipe``).

    Returns:
        The run directory (with ``seeds``: one per seed).

    Raises:
        UserError: Missing/mismatched experts, impossible IPC, existing output, divergence.
        Interrupted: A stop was requested; a checkpoint was written first.
    """
    runs = inputs.seed_settings(settings) if settings.seeds else None
    recipe = batch.BatchRecipe(runs, sink, DistillRecipe) if runs else DistillRecipe(settings, sink)
    with recipe:
        return recipe.train()


def _sgd_(param: torch.Tensor, buf: torch.Tensor, grad: torch.Tensor, lr: float, momentum: float) -> None:
    """SGD with momentum in place, with PyTorch's semantics: buf = m * buf + g; p -= lr * buf."""
    buf.mul_(momentum).add_(grad)
    param.sub_(lr * buf)
