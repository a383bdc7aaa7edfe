"""``dpd distill``: the distillation loop, as one recipe object around ``matching.meta_gradient``.

``DistillRecipe`` is what the CLI, the tests and the benchmarks all drive::

    with DistillRecipe(settings, sink) as recipe:   # setup(): experts, data, run dir, state (fresh or resumed)
        recipe.step()                               # one iteration
        recipe.checkpoint()                         # exact-resume state + outputs
        run_dir = recipe.train()                    # steps until done, with checkpoints and Ctrl-C handling

The state that must survive a resume lives in one ``DistillState``; a checkpoint holds exactly it.
Everything random in iteration ``i`` is derived from ``(seed, i)``: the expert, the start epoch,
the mini-batches and the DSA seeds. A resume therefore needs only the state, and reproduces an
uninterrupted run exactly on the same device. The run directory's files are written by
``dpd_cli.artifacts.run_writer``; checkpoint 0 (the initial images) is always written and kept.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dpd_cli import interrupt
from dpd_cli.artifacts import layout
from dpd_cli.artifacts import synthetic as synthetic_file
from dpd_cli.artifacts.experts import validation_record
from dpd_cli.artifacts.run_writer import RunWriter
from dpd_cli.config.settings import DistillSettings, settings_hash
from dpd_cli.core import matching, parallel
from dpd_cli.core.graphs import GraphedMetaGradient
from dpd_cli.core.pruning import PruneConfig, Pruner
from dpd_cli.data import load_dataset
from dpd_cli.errors import DivergedError, ExpertsError, OutputExistsError, StorageError
from dpd_cli.events import CheckpointSaved, DistillDone, DistillIteration, DistillStarted, Message, NullSink, Sink
from dpd_cli.io.provenance import versions
from dpd_cli.models import FlatModel, build_model
from dpd_cli.recipes.distill_inputs import (
    RESUMABLE,
    check_experts,
    draw_plan,
    init_images,
    other_settings,
    with_experts,
)
from dpd_cli.recipes.runtime import derive_seed, model_spec, prepare_runtime

__all__ = ["DistillRecipe", "DistillState", "run", "default_run_dir", "summarize"]

_MOMENTUM = 0.5  # SGD momentum of the images and of alpha, as MTT


def default_run_dir(s: DistillSettings) -> Path:
    return Path("runs") / f"{s.dataset}-ipc{s.ipc}-rho{s.prune_ratio:g}-s{s.seed}"


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
        out = {
            "images": self.images,
            "lr": self.lr,
            "momentum_images": self.momentum_images,
            "momentum_lr": self.momentum_lr,
            "prune_counts": self.prune_counts,
        }
        if self.prune_state is not None:
            out["prune_state"] = self.prune_state.float()
        if self.label_logits is not None:
            out.update(label_logits=self.label_logits, momentum_labels=self.momentum_labels)
        return out


class DistillRecipe:
    """One distillation run: ``setup``, ``step``, ``checkpoint``, ``train``, ``close``.

    Args:
        settings: Resolved ``dpd distill`` settings. Fields the user did not set (``model_fields_set``)
            among the dataset and network settings are taken from the experts folder, here, before
            anything else is set up.
        sink: Receives progress events.
    """

    def __init__(self, settings: DistillSettings, sink: Sink | None = None):
        self.sink = sink or NullSink()
        self._stack = contextlib.ExitStack()
        self.s, self.experts = with_experts(settings, self.sink)
        self._stack.callback(self.experts.close)
        self.prune = PruneConfig.from_settings(self.s)
        self._pending: list[dict] = []  # per-iteration records not yet on disk; device tensors until flushed
        self._window_t0 = 0.0
        self.last_loss = float("nan")

    # --- lifecycle ------------------------------------------------------------------------------
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
        """Check the experts, load the data, lock the run directory, start or resume the state.

        Under torchrun every rank sets up the same state; rank 0 alone locks, writes and reports.

        Raises:
            UserError: Mismatched experts, impossible IPC, existing output, nothing to resume.
        """
        self._setup_runtime()
        self._setup_data()
        resume = self._setup_run_dir()
        self._setup_state(resume)
        self.pruner = Pruner(self.prune, self.sizes, self.state.prune_state)
        self.graphed = self._graphed()
        self.pruned_total = _layer_totals(self.state.prune_counts, self.layer_ids, len(self.sizes))
        self.iterations_pruned = sum(1 for i in range(self.state.iteration) if self.prune.ratio_at(i) > 0)
        s = self.s
        self.sink.emit(
            DistillStarted(
                str(self.run_dir),
                self.state.iteration,
                s.iterations,
                [(layer.name, layer.numel) for layer in self.fm.layers],
                self.fm.n_params,
                len(self.state.images),
                len(self.experts),
                str(self.device),
                s.memory,
                s.prune_ratio,
                self.prune.text(),
                s.keep_graphs,
            )
        )
        if not resume:
            self.checkpoint()  # checkpoint 0: the real images the run starts from, always kept

    def _setup_runtime(self) -> None:
        """Threads, device, the process group under torchrun, and how a mini-batch's gradient is computed."""
        s = self.s
        self.device = prepare_runtime(s.threads, s.device, s.host_memory, s.deterministic)
        self.log_every = s.log_every or (1 if self.device.type == "cpu" else 10)
        self.group = parallel.start(self.device, s.dist_timeout)
        self._stack.callback(parallel.stop)
        self.main = self.group is None or self.group.is_main
        if not self.main:
            self.sink = NullSink()
        if self.group is not None and s.norm == "batch":
            raise ExpertsError(
                "--norm batch cannot be distilled over several processes: batch norm mixes the rows that the ranks "
                "split between them, so the result would depend on the number of ranks. Use --norm instance (MTT's), "
                "or run one process."
            )
        self.batch_grad = matching.BatchGradient() if self.group is None else parallel.ShardedGradient(self.group)

    def _setup_data(self) -> None:
        """The dataset and the network the experts were trained on."""
        s = self.s
        self.ds = load_dataset(s.dataset, s.data_dir, s.train_per_class, s.seed, s.val_per_class)
        self.spec = model_spec(s, self.ds)
        check_experts(self.experts, s, self.spec)
        self.pre = self.experts.preprocess

    def _setup_run_dir(self) -> bool:
        """Lock the run directory and refuse what must not be overwritten; True when resuming from a checkpoint."""
        s = self.s
        self.run_dir = Path(s.out) if s.out else default_run_dir(s)
        self.writer = RunWriter(self.run_dir, writes=self.main)
        if s.resume and not self.writer.checkpoints() and not (self.run_dir / layout.SETTINGS).exists():
            raise StorageError(
                f"Nothing to resume in {self.run_dir}: it has no checkpoint. Run without --resume to start it."
            )
        self.shash = settings_hash(s, exclude=set(RESUMABLE))
        self._stack.enter_context(interrupt.safe_points())
        resume = s.resume and bool(self.writer.checkpoints())
        if self.main:
            self.writer.lock(self._stack)
            if s.resume and not resume:
                # Stopped before checkpoint 0 was written: every choice is seeded, so starting over is the exact resume.
                if self.writer.recorded_settings_hash() != self.shash:
                    raise other_settings(self.run_dir)
                self.sink.emit(Message(f"{self.run_dir} has no checkpoint yet: starting from iteration 0."))
            self.writer.prepare(s.resume, s.force)
        if self.group is not None:
            self.group.barrier()  # the other ranks read the run directory only once rank 0 has it in order
        return resume

    def _setup_state(self, resume: bool) -> None:
        """The student network, the labels and the state: resumed from the newest checkpoint, or fresh."""
        s = self.s
        torch.manual_seed(derive_seed(s.seed, "student"))
        self.fm = FlatModel(build_model(self.spec).to(self.device))
        self.sizes = [layer.numel for layer in self.fm.layers]
        self.layer_ids = self.fm.layer_ids(self.device)
        label_theta = self._label_expert() if s.soft_labels else None
        accept = None
        if s.init == "real-correct":
            accept = lambda x, c: self.fm(label_theta, x).argmax(1) == c  # noqa: E731
        images, self.labels = init_images(s, self.ds, self.pre, self.device, accept)
        self.soft_info = None
        if resume:
            self.state = self._load_state(images.shape)
            self.writer.resumed(self.state.iteration)
            return
        self.state = DistillState(
            0,
            images,
            torch.tensor(s.lr_teacher, device=self.device),
            torch.zeros_like(images),
            torch.zeros((), device=self.device),
            torch.zeros(self.fm.n_params, dtype=torch.int32, device=self.device),
        )
        if s.soft_labels:
            with torch.no_grad():
                logits = torch.cat([self.fm(label_theta, images[i : i + 256]) for i in range(0, len(images), 256)])
            self.state.label_logits, self.state.momentum_labels = logits.float(), torch.zeros_like(logits).float()
            self.soft_info = {
                "expert": 0,
                "epoch": self._label_epoch(),
                "initial_accuracy": float((logits.argmax(1) == self.labels).float().mean()),
            }
            self.sink.emit(
                Message(
                    f"Soft labels: the logits of expert 0 at epoch {self.soft_info['epoch']} on the initial "
                    f"images; it classifies {self.soft_info['initial_accuracy']:.0%} of them correctly."
                )
            )
        self.writer.start(self._settings_record(), self.pre)

    # --- one iteration --------------------------------------------------------------------------
    def step(self) -> None:
        """Run iteration ``state.iteration``: unroll, mask, meta-gradient, update images and alpha."""
        s, st = self.s, self.state
        it = st.iteration
        rng = random.Random(derive_seed(s.seed, "iteration", it))
        e = rng.randrange(len(self.experts))
        t = rng.randrange(s.max_start_epoch)
        start, target = (_to_device(v, self.device) for v in self.experts.pair(e, t, s.expert_epochs))
        plan = draw_plan(rng, len(st.images), s, self.device)
        ratio = self.prune.ratio_at(it)
        if self.graphed is not None and self.graphed.enabled:  # stateless prune settings only: no unroll mask
            res, note = self.graphed(start, target, plan, ratio)
            if note:
                self.sink.emit(Message(note, "warning"))
        else:
            unroll_keep = self.pruner.unroll_keep(ratio)
            res = matching.meta_gradient(
                self.fm,
                st.images,
                self.labels,
                st.lr,
                start,
                target,
                plan,
                s.memory,
                loss_mask=self.pruner.loss_mask(ratio, unroll_keep),
                unroll_keep=unroll_keep,
                batch_grad=self.batch_grad,
                label_logits=st.label_logits,
                keep_graphs=s.keep_graphs,
            )
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
            pruned = torch.zeros(len(self.sizes), device=self.device)
            if res.keep is not None:
                dropped = (~res.keep).to(torch.int32)
                st.prune_counts.add_(dropped)
                pruned.index_add_(0, self.layer_ids, dropped.float())
        st.prune_state = self.pruner.state
        st.iteration = it + 1
        self._pending.append(
            {
                "iteration": it + 1,
                "loss": res.loss.float(),
                "lr": st.lr.clone(),
                "pruned": pruned,
                "expert": e,
                "start_epoch": t,
            }
        )

    def _graphed(self) -> GraphedMetaGradient | None:
        """The CUDA-graph runner (``--cuda-graphs``, on a GPU), or ``None`` with a message saying why not."""
        s = self.s
        if self.device.type != "cuda" or not s.cuda_graphs:
            return None
        st = self.state
        why = (
            "under torchrun"
            if self.group is not None
            else "--prune-mask ema and --prune-mode network carry state across iterations"
            if self.pruner.keeps_state
            else None
        )
        if why:
            self.sink.emit(Message(f"CUDA graphs not used ({why}); each iteration runs eagerly."))
            return None
        n = len(st.images)
        batch = s.batch_syn if s.batch_syn and s.batch_syn < n else None
        return GraphedMetaGradient(
            self.fm,
            st.images,
            self.labels,
            st.lr,
            s.memory,
            s.syn_steps,
            batch,
            s.dsa,
            self.pruner.loss_mask,
            label_logits=st.label_logits,
            keep_graphs=s.keep_graphs,
        )

    def _stop_requested(self) -> bool:
        """A stop request (Ctrl-C, SIGTERM) on any rank stops every rank at the same iteration."""
        if self.group is None:
            return interrupt.requested()
        return self.group.any(interrupt.requested(), self.device)

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
        rule = self.prune.text() if s.prune_ratio > 0 else None
        records = []
        for p, loss, a, pr in zip(pending, losses, lrs, pruned, strict=True):
            if not (loss == loss and abs(loss) != float("inf")) or not (a > 0 and a == a):
                raise self._diverged(p["iteration"], loss, a)
            if sum(pr):
                self.iterations_pruned += 1
            self.pruned_total = [a_ + b_ for a_, b_ in zip(self.pruned_total, pr, strict=True)]
            rec = {
                "iteration": p["iteration"],
                "loss": loss,
                "lr": a,
                "expert": p["expert"],
                "start_epoch": p["start_epoch"],
                "pruned": {layer.name: c for layer, c in zip(self.fm.layers, pr, strict=True)},
                "pruned_fraction": sum(pr) / self.fm.n_params,
                "seconds": dt,
            }
            if rule:
                rec["prune_rule"] = rule
            records.append(rec)
            self.sink.emit(
                DistillIteration(
                    p["iteration"],
                    s.iterations,
                    loss,
                    a,
                    p["start_epoch"],
                    pr,
                    list(self.pruned_total),
                    self.iterations_pruned,
                    dt,
                )
            )
            self.last_loss = loss
        self.writer.metrics(records)
        self._pending = []
        self._window_t0 = time.perf_counter()

    def _diverged(self, iteration: int, loss: float, a: float) -> DivergedError:
        last = self.writer.checkpoints()
        kept = f"the last good checkpoint ({last[0].name}) is kept" if last else "no checkpoint was written yet"
        what = (
            f"loss became {loss}"
            if not (loss == loss and abs(loss) != float("inf"))
            else f"the learning rate alpha became {a}"
        )
        how = (
            "rerun with --resume to continue from that checkpoint, or --force to start over"
            if last
            else "rerun with --force"
        )
        return DivergedError(
            f"Distillation diverged at iteration {iteration}: {what}; {kept}. Lower --lr-img or --lr-lr "
            f"(or --lr-teacher), then {how}."
        )

    def checkpoint(self) -> Path:
        """Flush the metrics, write the checkpoint of the current iteration and refresh the outputs (rank 0)."""
        self.flush()
        s, st = self.s, self.state
        meta = self._meta(st.iteration)
        path = self.writer.checkpoint(
            st.iteration,
            {**st.tensors(), "labels": self.labels},
            self.pre,
            meta,
            s.keep_checkpoints,
            s.checkpoint_every,
        )
        self.writer.outputs(
            st.images,
            self.labels,
            st.lr,
            st.label_logits,
            self.pre,
            meta,
            self.ds.n_classes,
            st.prune_counts,
            self.fm.layout,
            self.iterations_pruned,
            self.prune.rule(),
        )
        if self.main:
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
                    f"stopped after iteration {self.state.iteration}; rerun the same command with --resume to continue {self.run_dir}"
                )
            self.step()
            if len(self._pending) >= self.log_every:
                self.flush()
            if self.state.iteration % s.checkpoint_every == 0 and self.state.iteration < s.iterations:
                self.checkpoint()
        self.checkpoint()
        self.sink.emit(
            DistillDone(
                str(self.run_dir), s.iterations, self.last_loss, float(self.state.lr), time.perf_counter() - t_run
            )
        )
        return self.run_dir

    # --- records --------------------------------------------------------------------------------
    def _settings_record(self) -> dict:
        return {
            "command": "distill",
            "settings": self.s.model_dump(mode="json"),
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
            "validation": None
            if ds.val_indices is None
            else {"per_class": s.val_per_class, "fingerprint": ds.val_fingerprint},
            "prune_rule": self.prune.rule(),
            "soft_labels": self.soft_info,
            "versions": versions(),
        }

    def _label_epoch(self) -> int:
        return self.experts.epochs if self.s.label_epoch is None else self.s.label_epoch

    def _label_expert(self) -> torch.Tensor:
        """The parameters (expert 0 at --label-epoch) whose logits initialise the soft labels."""
        epoch = self._label_epoch()
        if epoch > self.experts.epochs:
            raise ExpertsError(
                f"--label-epoch {epoch}: the experts in {self.experts.folder} have epochs 0..{self.experts.epochs}."
            )
        return self.experts.files[0].rows("trajectory", [epoch])[0].to(self.device)

    def _load_state(self, image_shape) -> DistillState:
        def check(path: Path, t: dict, meta: dict) -> None:
            if ("label_logits" in t) != self.s.soft_labels:
                has = "soft labels" if "label_logits" in t else "hard labels"
                raise OutputExistsError(
                    f"{self.run_dir} was distilled with {has}; --soft-labels cannot be switched "
                    f"{'off' if 'label_logits' in t else 'on'} on --resume. Resume with the run's own setting, or start "
                    "over with --force (or another --out)."
                )
            if meta.get("settings_hash") != self.shash:
                raise other_settings(self.run_dir)
            if tuple(t["images"].shape) != tuple(image_shape):
                raise StorageError(
                    f"{path}: images have shape {tuple(t['images'].shape)}, expected {tuple(image_shape)}."
                )
            if t["prune_counts"].numel() != self.fm.n_params:
                raise StorageError(
                    f"{path}: prune counts for {t['prune_counts'].numel()} parameters, the model has "
                    f"{self.fm.n_params}. Start over with --force."
                )
            if int(meta["iteration"]) > self.s.iterations:
                raise OutputExistsError(
                    f"{self.run_dir} has a checkpoint at iteration {meta['iteration']}, past --iterations {self.s.iterations}: "
                    f"resuming would label that later state as iteration {self.s.iterations}. Resume with --iterations "
                    f"{meta['iteration']} or more, evaluate an earlier checkpoint directly (dpd evaluate "
                    "RUN/checkpoints/ckpt-NNNNNN.safetensors), or use --force to start over."
                )

        t, meta = self.writer.newest_state(check)
        dev = self.device
        opt = lambda k: None if k not in t else t[k].to(dev)  # noqa: E731
        self.soft_info = meta.get("soft_labels")
        return DistillState(
            int(meta["iteration"]),
            t["images"].to(dev),
            t["lr"].to(dev),
            t["momentum_images"].to(dev),
            t["momentum_lr"].to(dev),
            t["prune_counts"].to(dev),
            opt("prune_state"),
            opt("label_logits"),
            opt("momentum_labels"),
        )


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


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU -> device without a stream sync: copies from pinned memory are truly asynchronous."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _layer_totals(prune_counts: torch.Tensor, layer_ids: torch.Tensor, n_layers: int) -> list[int]:
    totals = torch.zeros(n_layers, dtype=torch.int64, device=prune_counts.device).index_add_(
        0, layer_ids, prune_counts.long()
    )
    return [int(v) for v in totals.tolist()]


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
