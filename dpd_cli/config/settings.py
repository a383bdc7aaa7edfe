"""Settings for every command, and how they are resolved.

Each command has one Pydantic model, built from groups several commands share (``DataFields``,
``ModelFields``, ``RunFields``); a subcommand's key joins its words with ``_`` (``experts_import``).
A setting is one field: type, default, constraints, ``description`` (its ``--help``) and optionally
``json_schema_extra={"panel": ...}`` (default: the ``panel`` of the declaring class). The flag, allowed
values, config key and environment variables are derived from it (``setting_infos``).

Precedence, lowest first: field default < config file (``--config`` or ``DPD_CONFIG``; top-level keys,
then the command's table ``[distill]``) < ``DPD_<SETTING>`` < ``DPD_<COMMAND>_<SETTING>`` < flag.

A setting has the shared variable ``DPD_<SETTING>`` only if its name means the same in every command
that has it: declared once, or redeclared with ``json_schema_extra={"shared": True}``. Otherwise
(``out``, ``epochs``, ``lr``...) setting ``DPD_OUT`` is an error naming the command's own variable, so
one variable never silently sets two different things.

This module imports nothing heavy, so ``dpd --help`` stays instant.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from itertools import groupby
from pathlib import Path, PurePath
from typing import Any, ClassVar, Literal

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dpd_cli.errors import SettingsError
from dpd_cli.models import MODEL_NAMES
from dpd_cli.text import plural

#: Datasets the registry knows (``dpd_cli.data``); kept here so validation needs no torch.
DATASET_NAMES = tuple("fashion-mnist-mini fashion-mnist mnist cifar10 cifar100 svhn tiny-imagenet imagefolder".split())
#: Why ``--device mps`` is refused (here and by ``recipes.runtime.resolve_device``); see docs/guide.md.
MPS_REFUSED = (
    "mps is not supported: Apple's MPS backend has no float64, and dpd builds float64 tensors on the device "
    "(for example to total the pruning counts per layer). Use --device cpu; on a Mac, --device auto picks the CPU."
)
#: ``--help`` panels in the order they are printed; a panel not listed here comes after them.
#: ("Exit code" holds --fail-if-no-gain alone: beside --fail-under's value column its variable's name would be cut.)
PANELS = ("Data", "Distillation", "Pruning", "Memory", "Training", "Evaluation", "Model", "Output", "Exit code", "Run")
#: The variable that names a config file when ``--config`` is not given.
CONFIG_ENV = "DPD_CONFIG"
#: The ``DPD_*`` variables that are not settings; any other ``DPD_*`` variable must name a setting
#: (docs/guide.md lists them too).
OTHER_ENV = {
    CONFIG_ENV: "a config file, when --config is not given",
    "DPD_DEBUG": "1: show the traceback of an error",
    "DPD_EXPERTS_ROOT": "where experts folders go (dpd_cli.io.paths)",
    "DPD_DATA_ROOT": "where downloaded datasets go (dpd_cli.io.paths)",
    "DPD_CACHE_ROOT": "where decoded image folders are cached (dpd_cli.io.paths)",
}
#: What ``dpd export --format`` writes (``dpd_cli.artifacts.export``).
EXPORT_FORMATS = ("mtt", "datm", "imagefolder", "npz")
_DATA_DIR_HELP = (
    "Dataset folder (imagefolder: with train/ and test/; default: the dpd cache, downloading on first use)."
)
#: Datasets read from a folder the user names, and what that folder is.
_FOLDER_DATASETS = {
    "imagefolder": "a folder with train/ and test/",
    "tiny-imagenet": "the unpacked tiny-imagenet-200 folder",
}


def _setting(default: Any, description: str, panel: str | None = None, *, shared=False, choices=(), **constraints):
    """A settings field: default, ``--help`` text, ``--help`` panel (default: the class's), ``shared`` (a
    redeclaration that means the same as the others), the values ``--help`` lists, Pydantic constraints."""
    extra = {k: v for k, v in {"panel": panel, "shared": shared, "choices": choices}.items() if v}
    return Field(default, description=description, json_schema_extra=extra, **constraints)


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    #: The ``--help`` panel of the fields this class declares without a ``panel`` of their own.
    panel: ClassVar[str] = "Options"

    @field_validator("*", mode="before")
    @classmethod
    def _normalise(cls, v: Any, info) -> Any:
        """What every field gets from its type: no empty paths, comma lists, case-insensitive choices."""
        s = setting_infos(cls)[info.field_name]
        if s.kind == "path" and isinstance(v, str) and not v.strip():
            # Path("") is the current folder: an empty --out or --data-dir must not silently mean ".".
            raise ValueError("the path is empty; give a path, or leave the setting out for the default")
        if s.kind == "list" and isinstance(v, str):
            v = [p for p in (part.strip() for part in v.split(",")) if p]
        if s.kind == "float" and _is_nan(v):  # NaN fails every comparison: Pydantic would name a bound it meets
            raise ValueError(f"must be a number{_range(cls.model_fields[info.field_name].metadata)}")
        if s.literal and s.kind == "choice":
            v = _choose(v, s)
        elif s.literal and isinstance(v, list):
            v = [_choose(x, s) for x in v]
        return v


def _is_nan(value: Any) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _range(constraints: list) -> str:
    """`` in [0, 1)``, `` above 0``, `` of at most 100``...: the values a float field's constraints allow."""
    b = {k: getattr(c, k) for c in constraints for k in ("ge", "gt", "le", "lt") if getattr(c, k, None) is not None}
    low = f"[{b['ge']:g}" if "ge" in b else f"({b['gt']:g}" if "gt" in b else ""
    high = f"{b['le']:g}]" if "le" in b else f"{b['lt']:g})" if "lt" in b else ""
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" {'above' if 'gt' in b else 'of at least'} {low[1:]}"
    return f" {'below' if 'lt' in b else 'of at most'} {high[:-1]}" if high else ""


def _choose(value: Any, s: SettingInfo) -> Any:
    """The allowed value ``value`` names, ignoring case; anything else is an error listing them."""
    if not isinstance(value, str):
        return value  # Pydantic reports the wrong type
    key = value.strip().lower()
    by_key = {str(c).lower(): c for c in s.literal}
    if key in by_key:
        return by_key[key]
    names = [str(c) for c in s.literal]
    noun = s.name.replace("_", " ")
    if s.kind == "list":
        noun = noun.removesuffix("s")  # "models" lists model names
    raise ValueError(f"unknown {noun} {key!r}{_did_you_mean(key, names)}; known: {', '.join(names)}")


class DataFields(_Settings):
    panel: ClassVar[str] = "Data"

    dataset: Literal[DATASET_NAMES] = _setting("fashion-mnist-mini", "Dataset to train on.")
    data_dir: Path | None = _setting(None, _DATA_DIR_HELP)
    zca: bool = _setting(False, "ZCA-whiten images as MTT (eps 0.1, fitted on the raw [0, 1] training pixels).")
    train_per_class: int | None = _setting(
        None, "Use only this many training images per class (seeded, class-balanced).", ge=1
    )
    val_per_class: int | None = _setting(
        None,
        "Hold out this many training images per class as a validation split, never trained on (needed "
        "by evaluate --select val).",
        ge=1,
    )

    @model_validator(mode="after")
    def _folder_datasets_need_dir(self) -> DataFields:
        if self.dataset in _FOLDER_DATASETS and self.data_dir is None:
            raise ValueError(f"dataset {self.dataset!r} needs --data-dir pointing at {_FOLDER_DATASETS[self.dataset]}")
        return self


class ModelFields(_Settings):
    panel: ClassVar[str] = "Model"

    model: Literal[MODEL_NAMES] = _setting("convnet", "Network architecture.")
    width: int = _setting(128, "ConvNet channels per layer.", ge=1, le=4096)
    depth: int | None = _setting(None, "ConvNet depth (default: from the image size).", ge=1, le=8)
    norm: Literal["instance", "batch", "none"] = _setting("instance", "Normalisation layers.")
    pool: Literal["avg", "max"] = _setting("avg", "ConvNet pooling.")


class RunFields(_Settings):
    panel: ClassVar[str] = "Run"

    seed: int = _setting(0, "Seed for every random choice.", ge=0)
    device: str = _setting(
        "auto",
        "Device to run on (auto: the first CUDA GPU if there is one, else the CPU).",
        choices=["auto", "cpu", "cuda", "cuda:N"],
    )
    threads: int | None = _setting(None, "CPU threads for torch (default: the cores available).", ge=1)
    host_memory: Literal["reuse", "system"] = _setting(
        "reuse",
        "CPU allocator: reuse keeps freed tensor memory in the process (faster, somewhat higher peak RSS); "
        "system returns it after every use. Only on glibc Linux.",
    )
    deterministic: bool = _setting(
        False,
        "On a GPU, use cuDNN's deterministic algorithms so that runs repeat (distillation only to rounding). "
        "Can be slower.",
    )
    dist_timeout: float = _setting(300.0, "Under torchrun: seconds a rank waits for the others.", gt=0)

    @field_validator("device")
    @classmethod
    def _device_form(cls, v: str) -> str:
        v = v.lower()
        if v == "mps":
            raise ValueError(MPS_REFUSED)
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda or cuda:N")
        return v


class ExpertSettings(DataFields, ModelFields, RunFields):
    """``dpd experts``: train expert trajectories on real data."""

    panel: ClassVar[str] = "Training"

    num: int = _setting(50, "Number of experts to train.", ge=1)
    epochs: int = _setting(50, "Epochs per expert (one snapshot per epoch).", ge=1)
    lr: float = _setting(0.01, "SGD learning rate.", gt=0)
    momentum: float = _setting(0.0, "SGD momentum.", ge=0, lt=1)
    weight_decay: float = _setting(0.0, "SGD weight decay.", ge=0)
    batch: int = _setting(256, "Mini-batch size.", ge=1)
    concurrent: int | None = _setting(
        None,
        "Experts trained at once as one batched computation, each as it would be alone (1: one at a time; "
        "default: 1 on the CPU, 4 on a GPU).",
        ge=1,
    )
    dsa: bool = _setting(True, "Differentiable siamese augmentation while training.")
    out: Path | None = _setting(None, "Experts folder (default: <experts root>/<dataset>/<model tag>).", "Output")


class DistillSettings(DataFields, ModelFields, RunFields):
    """``dpd distill``: trajectory matching with Difference-Driven Pruning."""

    panel: ClassVar[str] = "Distillation"

    experts: Path | None = _setting(
        None,
        "Experts folder (default: the newest fitting one under the experts root); its dataset and network "
        "settings apply unless given.",
        "Data",
    )
    ipc: int = _setting(10, "Synthetic images per class.", ge=1)
    iterations: int = _setting(5000, "Distillation iterations.", ge=1)
    syn_steps: int = _setting(20, "N: student steps on the synthetic set per iteration.", ge=1)
    expert_epochs: int = _setting(2, "M: expert epochs the student must match.", ge=1)
    max_start_epoch: int = _setting(20, "T+: start epochs are drawn from 0..T+-1.", ge=1)
    lr_img: float = _setting(1000.0, "Learning rate of the synthetic pixels.", gt=0)
    lr_img_warmup: int = _setting(
        0, "Ramp the pixels' learning rate linearly up to --lr-img over the first K iterations (0: off).", ge=0
    )
    clip_img: float = _setting(
        0.0,
        "Clip the norm of each iteration's pixel gradient at C (0: off; metrics.jsonl records it: grad_norm).",
        ge=0,
    )
    lr_lr: float = _setting(1e-5, "Learning rate of the learnable step size alpha.", ge=0)
    lr_teacher: float = _setting(0.01, "Initial student step size alpha_0.", gt=0)
    batch_syn: int | None = _setting(None, "Synthetic mini-batch per student step (default: all).", ge=1)
    prune_ratio: float = _setting(0.01, "rho: fraction pruned from the loss; 0 is MTT.", "Pruning", ge=0, lt=1)
    prune_scope: Literal["global", "layer"] = _setting(
        "global", "Rank parameters globally or within each layer.", "Pruning"
    )
    prune_criterion: Literal["abs", "relative", "layer-z", "layer-rank"] = _setting(
        "abs",
        "Score ranking parameters: abs |student - target|; relative: abs / (|start - target| + eps); "
        "layer-z: abs standardised per layer; layer-rank: abs's rank in its layer / layer size.",
        "Pruning",
    )
    prune_direction: Literal["largest", "smallest"] = _setting(
        "largest", "Prune the largest scores (DPD) or the smallest (PAD).", "Pruning"
    )
    prune_mask: Literal["step", "ema"] = _setting(
        "step", "Mask from this iteration's scores or their moving average.", "Pruning"
    )
    prune_ema_beta: float | None = _setting(
        None, "With --prune-mask ema: the average's weight of the past (default 0.9).", "Pruning"
    )
    prune_mode: Literal["loss", "network"] = _setting(
        "loss",
        "loss: prune from the loss only; network: also freeze pruned parameters at the expert's start.",
        "Pruning",
    )
    prune_warmup: int = _setting(0, "No pruning during the first K iterations.", "Pruning", ge=0)
    memory: Literal["full", "low"] = _setting(
        "full", "full: keep the unrolled graph; low: recompute it, memory flat in N.", "Memory"
    )
    keep_graphs: int = _setting(
        0,
        "With --memory low: keep the last K of the N steps' graphs instead of recomputing them (K = N: "
        "full's memory and time).",
        "Memory",
        ge=0,
    )
    cuda_graphs: bool = _setting(
        True,
        "On a GPU, replay one iteration's meta-gradient as a CUDA graph once checked against eager mode. "
        "Not under torchrun, --prune-mask ema or --prune-mode network.",
        "Memory",
    )
    init: Literal["real", "real-correct", "noise"] = _setting(
        "real", "Initial images: real samples, real samples the label expert gets right (with --soft-labels), or noise."
    )
    soft_labels: bool = _setting(
        False,
        "Learn soft labels too (DATM): logits from an expert on the initial images, trained by the meta-gradient.",
    )
    label_epoch: int | None = _setting(
        None, "With --soft-labels: the epoch of expert 0 whose logits initialise the labels (default: its last).", ge=0
    )
    lr_y: float = _setting(2.0, "With --soft-labels: learning rate of the label logits (SGD).", gt=0)
    momentum_y: float = _setting(0.9, "With --soft-labels: SGD momentum of the label logits.", ge=0, lt=1)
    dsa: bool = _setting(True, "Differentiable siamese augmentation in student steps.")
    checkpoint_every: int = _setting(100, "Iterations between checkpoints.", "Output", ge=1)
    keep_checkpoints: Literal["latest", "all"] | int = _setting(
        "latest",
        "Checkpoints kept besides checkpoint 0 and the newest two, for evaluate --select: latest (none), "
        "all, or N (every N-th).",
        "Output",
    )
    log_every: int | None = _setting(
        None, "Iterations between metric flushes (default: 1 on CPU, 10 on GPU).", "Output", ge=1
    )
    out: Path | None = _setting(
        None,
        "Run directory (default: named after dataset, IPC, ratio and seed, e.g. runs/cifar10-ipc10-rho0.01-s0).",
        "Output",
    )
    seeds: list[int] | None = _setting(
        None,
        "Run one distillation per seed (e.g. 0,1,2) as one batched computation, instead of --seed: each writes "
        "the run directory --seed S would (with --out X: X-sS), with the same results up to rounding.",
        "Run",
    )
    resume: bool = _setting(False, "Continue the run in --out from its last checkpoint.", "Output")
    force: bool = _setting(False, "Overwrite an existing run in --out.", "Output")

    @field_validator("keep_checkpoints", mode="before")
    @classmethod
    def _keep_form(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip().lower()
            if v.isdigit():
                v = int(v)
            elif v not in ("latest", "all"):
                raise ValueError("use latest, all, or a positive N to keep every N-th checkpoint")
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError(f"keep {v} of the checkpoints? Use latest, all, or a positive N to keep every N-th")
        return v

    @model_validator(mode="after")
    def _flags_agree(self) -> DistillSettings:
        if self.resume and self.force:
            raise ValueError("can't use both --resume and --force: --resume continues the run, --force starts it over")
        if self.seeds is not None and (not self.seeds or min(self.seeds) < 0 or len(set(self.seeds)) < len(self.seeds)):
            raise ValueError(f"--seeds needs distinct seeds >= 0, e.g. 0,1,2 (got {self.seeds})")
        if self.prune_warmup >= self.iterations and self.prune_ratio > 0:
            raise ValueError(f"--prune-warmup {self.prune_warmup} leaves no pruned iteration of {self.iterations}")
        if not self.soft_labels and (self.label_epoch is not None or self.init == "real-correct"):
            what = "--label-epoch" if self.label_epoch is not None else "--init real-correct"
            raise ValueError(f"{what} needs --soft-labels: it concerns the expert whose logits initialise the labels")
        if self.keep_graphs and self.memory != "low":
            raise ValueError(
                f"--keep-graphs {self.keep_graphs} is for --memory low (full memory keeps every step's "
                "graph already): add --memory low, or drop --keep-graphs"
            )
        if self.keep_graphs > self.syn_steps:
            raise ValueError(
                f"--keep-graphs {self.keep_graphs} is more than the {plural(self.syn_steps, 'step')} of the unroll "
                f"(--syn-steps): use at most {self.syn_steps}"
            )
        if self.prune_ema_beta is not None and self.prune_mask != "ema":
            raise ValueError(
                f"--prune-ema-beta is the moving average's weight: it needs --prune-mask ema (the mask is {self.prune_mask!r})"
            )
        if self.prune_ema_beta is not None and not 0 <= self.prune_ema_beta < 1:
            raise ValueError(
                f"--prune-ema-beta must lie in [0, 1) (got {self.prune_ema_beta:g}): 0 uses only "
                "the current iteration, values near 1 a long memory"
            )
        return self

    @property
    def ema_beta(self) -> float:
        """The moving average's weight of the past (0.9 unless --prune-ema-beta says otherwise)."""
        return 0.9 if self.prune_ema_beta is None else self.prune_ema_beta


class EvalSettings(RunFields):
    """``dpd evaluate``: train fresh networks on a synthetic set, test on the real test set."""

    panel: ClassVar[str] = "Evaluation"

    models: list[Literal[MODEL_NAMES]] = _setting(["convnet"], "Architectures to train.")
    runs: int = _setting(5, "Networks trained per architecture.", ge=1)
    protocol: Literal["mtt", "fixed"] = _setting(
        "mtt", "MTT's evaluation loop; mtt: E = 1000 at the learned alpha; fixed: E = 300 at lr 0.01."
    )
    epochs: int | None = _setting(None, "Override the protocol's E (E + 1 epochs run, as in MTT).", ge=1)
    lr: float | None = _setting(None, "Override the protocol's learning rate.", gt=0)
    batch: int = _setting(256, "Mini-batch size.", ge=1)
    concurrent: int | None = _setting(
        None,
        "Networks trained at once as one batched computation, each as it would be alone (1: one at a time; "
        "default: 1 on the CPU, 8 on a GPU).",
        shared=True,
        ge=1,
    )
    momentum: float = _setting(0.9, "SGD momentum.", ge=0, lt=1)
    weight_decay: float = _setting(5e-4, "SGD weight decay.", ge=0)
    dsa: bool = _setting(True, "DSA while training the evaluation networks.")
    baseline: list[Literal["random", "full", "init"]] = _setting(
        [],
        "Also evaluate baselines: random (real images, same IPC), full (all training images), init (the run's "
        "initial images).",
    )
    select: Literal["val", "final", "test-max"] | None = _setting(
        None,
        "Checkpoint to report: val (best on the validation split; default when there is one), final, or "
        "test-max (best on the test set: optimistic).",
    )
    full_epochs: int = _setting(20, "E for the full-data baseline (E + 1 epochs run).", ge=1)
    distilled: bool = _setting(True, "Evaluate the synthetic set itself (--no-distilled: only the baselines).")
    fail_under: float | None = _setting(
        None, "Exit 3 if a distilled mean accuracy is below this percentage.", "Output", ge=0, le=100
    )
    fail_if_no_gain: bool = _setting(
        False,
        "Exit 3 if distillation did not help: checkpoint 0 (the initial images) selected, or the final set below "
        "it beyond noise.",
        "Exit code",
    )
    data_dir: Path | None = _setting(
        None, "Folder with the dataset's files, if not where the run found them.", "Data", shared=True
    )

    @field_validator("models")
    @classmethod
    def _some_model(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one model")
        return v

    @field_validator("fail_under")
    @classmethod
    def _percent(cls, v: float | None) -> float | None:
        if v is not None and 0 < v <= 1:
            raise ValueError(
                f"the threshold is a percentage (0-100), and {v:g} looks like a fraction: for {100 * v:g} % give {100 * v:g}"
            )
        return v

    @model_validator(mode="after")
    def _something_to_do(self) -> EvalSettings:
        if not self.distilled and not self.baseline:
            raise ValueError("--no-distilled leaves nothing to evaluate: add --baseline random and/or full")
        return self


class ImportSettings(ModelFields):
    """``dpd experts import``: convert MTT / FTD / DATM replay buffers into a dpd experts folder.

    The buffers hold parameters only: what else is known is stated here or recorded as unknown (``None``).
    """

    panel: ClassVar[str] = "Training"

    dataset: Literal[DATASET_NAMES] | None = _setting(
        None, "Dataset the buffers' experts were trained on (required).", "Data", shared=True
    )
    data_dir: Path | None = _setting(None, _DATA_DIR_HELP, "Data", shared=True)
    zca: bool | None = _setting(
        None, "Required: whether the buffers were trained on ZCA-whitened images (MTT's --zca).", "Data", shared=True
    )
    model: Literal["convnet"] = _setting("convnet", "Network the buffers hold (MTT's ConvNet).", "Model", shared=True)
    lr: float | None = _setting(None, "The experts' SGD learning rate, if you know it (recorded, not checked).", gt=0)
    momentum: float | None = _setting(None, "The experts' SGD momentum, if you know it (recorded).", ge=0, lt=1)
    weight_decay: float | None = _setting(None, "The experts' SGD weight decay, if you know it (recorded).", ge=0)
    batch: int | None = _setting(None, "The experts' mini-batch size, if you know it (recorded).", ge=1)
    dsa: bool | None = _setting(None, "Whether the experts were trained with DSA, if you know it (recorded).")
    out: Path | None = _setting(
        None, "Experts folder to write (default: <experts root>/<dataset>/<model tag>[-zca]-imported).", "Output"
    )
    threads: int | None = _setting(
        None, "CPU threads for torch (default: the cores available).", "Run", shared=True, ge=1
    )

    @model_validator(mode="after")
    def _folder_datasets_need_dir(self) -> ImportSettings:
        if self.dataset in _FOLDER_DATASETS and self.data_dir is None:
            raise ValueError(f"dataset {self.dataset!r} needs --data-dir pointing at its folder")
        return self


class ExportSettings(_Settings):
    """``dpd export``: write a synthetic set in the files other tools read."""

    panel: ClassVar[str] = "Output"

    format: Literal[EXPORT_FORMATS] | None = _setting(
        None,
        "Required. mtt / datm: images_best.pt, labels_best.pt (mtt: class indices, hard labels only; datm: "
        "logits), lr_best.pt (alpha) and the preprocessing; imagefolder: PNGs <NN>-<class>/<i>.png; npz: one "
        "NumPy archive.",
    )
    out: Path | None = _setting(None, "Folder to write (required; refused if it exists, unless --force).")
    # As distill's --force: replace what --out holds.
    force: bool = _setting(False, "Replace --out if it holds an earlier export (or is empty).", shared=True)


class StudySettings(BaseModel):
    """The ``[study]`` table of a ``dpd study`` config: which variants of ``[distill]`` run on which seeds.

    Every variant's runs of one seed share the experts, the initial images, every per-iteration draw and
    the evaluation seeds (all derived from the seed), so each variant minus ``baseline`` is a paired difference.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: Distill settings the study sets itself, per run.
    RESERVED: ClassVar[tuple[str, ...]] = ("seed", "out", "experts", "resume", "force")

    seeds: list[int] = Field(min_length=1, description="The seeds; each variant runs once per seed.")
    variants: dict[str, dict[str, Any]] = Field(
        min_length=1, description="name = {distill settings that differ from [distill]}."
    )
    baseline: str = Field("mtt", description="The variant every other one is compared with.")
    out: Path | None = Field(None, description="Study folder (default: runs/study-<config name>).")
    experts: Path | None = Field(
        None, description="Experts folder (default: <out>/experts); [experts] trains what it lacks."
    )
    concurrent: int | None = Field(
        None, ge=1, description="Runs distilled at once as one computation (default: 4 on the CPU, 8 on a GPU)."
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError("the seeds must be distinct and non-negative")
        return v

    @model_validator(mode="after")
    def _known_baseline(self) -> StudySettings:
        if self.baseline not in self.variants:
            raise ValueError(f"baseline {self.baseline!r} is not a variant; variants: {', '.join(self.variants)}")
        for name, v in self.variants.items():
            if not re.fullmatch(r"[\w.@+-]+", name):
                raise ValueError(f"variant name {name!r}: use letters, digits and . _ - + @ (it names a folder)")
            clash = sorted(set(v) & set(self.RESERVED))
            if clash:
                raise ValueError(f"variant {name!r} sets {', '.join(clash)}: the study sets these itself, per run")
        return self


def study_settings(config: Path) -> StudySettings:
    """The ``[study]`` table of ``config``; raises ``SettingsError`` saying what is wrong."""
    data = _load_file(Path(config), "CONFIG")
    if not isinstance(data.get("study"), dict):
        raise SettingsError(
            f'Config file {config} has no [study] table. Add one with seeds = [0, 1, 2], baseline = "mtt" and '
            "variants = {mtt = {prune_ratio = 0}, dpd = {prune_ratio = 0.01}} (see examples/study-quick.toml)."
        )
    try:
        return StudySettings.model_validate(data["study"])
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'study'}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        )
        raise SettingsError(f"Config file {config}, [study]: {problems}.") from None


COMMAND_SETTINGS: dict[str, type[_Settings]] = {
    "experts": ExpertSettings,
    "experts_import": ImportSettings,
    "distill": DistillSettings,
    "evaluate": EvalSettings,
    "export": ExportSettings,
}


def command_title(command: str) -> str:
    """The command as typed after ``dpd``: ``experts_import`` -> ``experts import``."""
    return command.replace("_", " ")


# --- what each field declares -----------------------------------------------------------------
@dataclass(frozen=True)
class SettingInfo:
    """One setting as the command line, config files and the environment see it."""

    name: str  # the field name, also the config key
    kind: str  # bool, int, float, path, choice, list or text
    literal: tuple  # the allowed values of a Literal type (or of a list's items)
    choices: tuple[str, ...]  # the values --help lists: literal, or json_schema_extra["choices"]
    panel: str
    description: str
    default: Any
    declared_by: type
    shared: bool  # json_schema_extra["shared"]: a redeclaration that means the same as the others

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _without_none(annotation: Any) -> Any:
    """``X`` from ``X | None``; unions of several types are returned as they are."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _kind(annotation: Any) -> tuple[str, tuple]:
    t = _without_none(annotation)
    origin = typing.get_origin(t)
    if origin is Literal:
        return "choice", typing.get_args(t)
    if origin in (list, tuple, set, frozenset):
        item = _without_none((typing.get_args(t) or (str,))[0])
        return "list", typing.get_args(item) if typing.get_origin(item) is Literal else ()
    if isinstance(t, type) and issubclass(t, PurePath):
        return "path", ()
    return {bool: "bool", int: "int", float: "float"}.get(t, "text"), ()


@cache
def setting_infos(cls: type[_Settings]) -> dict[str, SettingInfo]:
    """Every field of a settings model as a ``SettingInfo``, in declaration order."""
    out = {}
    for name, f in cls.model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        owner = next(k for k in cls.__mro__ if name in vars(k).get("__annotations__", {}))
        kind, literal = _kind(f.annotation)
        choices = tuple(str(c) for c in literal or extra.get("choices", ()))
        panel = str(extra.get("panel") or owner.__dict__.get("panel") or _Settings.panel)
        default, shared = f.get_default(call_default_factory=True), bool(extra.get("shared"))
        out[name] = SettingInfo(name, kind, literal, choices, panel, f.description or "", default, owner, shared)
    return out


def by_panel(cls: type[_Settings]) -> list[SettingInfo]:
    """The settings of ``cls`` in ``--help`` order: by panel (``PANELS`` first), then as declared."""
    return sorted(
        setting_infos(cls).values(),
        key=lambda s: (PANELS.index(s.panel) if s.panel in PANELS else len(PANELS), s.panel),
    )


# --- environment variables --------------------------------------------------------------------
def env_var(field: str) -> str:
    """The shared environment variable of ``field``: ``prune_ratio`` -> ``DPD_PRUNE_RATIO``."""
    return "DPD_" + field.upper()


def command_env_var(command: str, field: str) -> str:
    """The command's own variable: (``distill``, ``out``) -> ``DPD_DISTILL_OUT``."""
    return f"DPD_{command.upper()}_{field.upper()}"


@cache
def _commands_with(field: str) -> tuple[str, ...]:
    return tuple(c for c, cls in COMMAND_SETTINGS.items() if field in cls.model_fields)


@cache
def _is_shared(field: str) -> bool:
    """True when ``field`` means the same in every command that has it (see the module docstring)."""
    infos = [setting_infos(COMMAND_SETTINGS[c])[field] for c in _commands_with(field)]
    return len({s.declared_by for s in infos if not s.shared}) <= 1


def env_names(command: str, field: str) -> tuple[str, str | None]:
    """``(command's own variable, shared variable or None)`` for one setting of one command."""
    return command_env_var(command, field), (env_var(field) if _is_shared(field) else None)


def _ambiguous_env(command: str, cls: type[_Settings], env: Mapping[str, str]) -> list[str]:
    problems = []
    for name in cls.model_fields:
        var = env_var(name)
        if not _is_shared(name) and env.get(var, "") != "":
            others = [c for c in _commands_with(name) if c != command]
            names = [f"`dpd {command_title(c)}`" for c in (command, *others)]
            where = ", ".join(names[:-1]) + " and " + names[-1]
            theirs = ", ".join(f"{command_env_var(c, name)} for `dpd {command_title(c)}`" for c in others)
            problems.append(
                f"{var} is set, but {name!r} means different things in {where}: set "
                f"{command_env_var(command, name)} instead ({theirs}) and unset {var}"
            )
    return problems


def _unknown_env(env: Mapping[str, str]) -> list[str]:
    """A problem for each set ``DPD_*`` variable that names no setting of any command (a typo would be ignored)."""
    known = set(OTHER_ENV)
    for command, cls in COMMAND_SETTINGS.items():
        known.update(v for name in cls.model_fields for v in (command_env_var(command, name), env_var(name)))
    return [
        f"{var} is not a dpd variable{_did_you_mean(var, known)}"
        for var in sorted(env)
        if var.startswith("DPD_") and var not in known and env[var] != ""
    ]


# --- config files -----------------------------------------------------------------------------
def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _load_file(path: Path, given_by: str) -> dict[str, Any]:
    if path.is_dir():
        raise SettingsError(f"Config file {path} is a folder. Give the path of a TOML, JSON or YAML settings file.")
    if not path.is_file():
        raise SettingsError(f"Config file {path} does not exist. Check the {given_by} path.")
    text = path.read_text(encoding="utf-8", errors="replace")
    suffix = path.suffix.lower()
    parse = json.loads if suffix == ".json" else tomllib.loads
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise SettingsError(
                f"{path} is YAML but PyYAML is not installed: `pip install pyyaml`, or use TOML."
            ) from e
        parse = yaml.safe_load
    try:
        data = parse(text)
    except json.JSONDecodeError as e:
        raise SettingsError(
            f"Config file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}."
        ) from e
    except Exception as e:  # tomllib.TOMLDecodeError and yaml.YAMLError both say where
        where, problem = _syntax_error_position(e, text)
        raise SettingsError(
            f"Config file {path} has a syntax error{where}: {problem}. Fix that line and run again."
        ) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(
            f"Config file {path} must hold a table of settings (key = value), not {type(data).__name__}."
        )
    return data


def _syntax_error_position(e: Exception, text: str) -> tuple[str, str]:
    """``(" (line L, column C)", one-line problem)`` from a TOML or YAML parse error."""
    mark = getattr(e, "problem_mark", None)  # yaml.MarkedYAMLError
    if mark is not None:
        problem = " ".join(p for p in (getattr(e, "problem", None), getattr(e, "context", None)) if p)
        return f" (line {mark.line + 1}, column {mark.column + 1})", problem or str(e).splitlines()[0]
    msg = " ".join(str(e).split())
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)", msg)  # tomllib.TOMLDecodeError
    if m:
        return f" (line {m.group(1)}, column {m.group(2)})", (msg[: m.start()] + msg[m.end() :]).strip()
    if "(at end of document)" in msg:
        problem = msg.replace("(at end of document)", "").strip()
        return f" (line {text.count(chr(10)) + 1}, at the end of the file)", problem
    return "", msg


def _file_values(command: str, cls: type[_Settings], data: dict[str, Any], path: Path) -> dict[str, tuple[Any, bool]]:
    """``{field: (value, from the command's table)}`` from a loaded config file."""
    fields = cls.model_fields
    known = {f for c in COMMAND_SETTINGS.values() for f in c.model_fields}
    problems: list[str] = []
    values: dict[str, tuple[Any, bool]] = {}
    for key, value in data.items():
        norm = key.replace("-", "_")
        if isinstance(value, dict):
            if key not in COMMAND_SETTINGS and key != "study":  # [study]: read by StudySettings
                tables = ", ".join([*COMMAND_SETTINGS, "study"])
                problems.append(f"unknown table [{key}]{_did_you_mean(key, COMMAND_SETTINGS)}; tables: {tables}")
        elif norm in fields:
            values[norm] = (value, False)
        elif norm not in known:
            problems.append(f"unknown key {key!r}{_did_you_mean(norm, known)}")
    for key, value in (data.get(command) or {}).items():
        norm = key.replace("-", "_")
        if norm in fields:
            values[norm] = (value, True)
        else:
            problems.append(f"unknown key {key!r} in [{command}]{_did_you_mean(norm, fields)}")
    if problems:
        help_hint = f". Run `dpd {command_title(command)} --help` for the valid settings."
        raise SettingsError(f"Config file {path}: " + "; ".join(problems) + help_hint)
    return values


# --- resolution -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resolved:
    """A command's validated settings, the config file read (if any) and where each value came from:
    ``default``, ``file PATH`` (``file PATH [distill]`` from the command's table), ``env VAR`` or ``flag --name``."""

    command: str
    settings: _Settings
    sources: dict[str, str]
    config: Path | None


def resolve(command: str, flags: Mapping[str, Any], config: Path | None = None, env: Mapping[str, str] | None = None):
    """Resolve one command's settings: ``resolve_sources(...).settings``."""
    return resolve_sources(command, flags, config, env).settings


def resolve_sources(
    command: str, flags: Mapping[str, Any], config: Path | None = None, env: Mapping[str, str] | None = None
) -> Resolved:
    """Resolve one command's settings: default < config file < ``DPD_<SETTING>`` < ``DPD_<COMMAND>_<SETTING>`` < flag.

    ``flags`` maps a setting to its command-line value (``None``: not given); ``config`` defaults to the file
    named by ``DPD_CONFIG``; ``env`` to ``os.environ``, where an empty variable counts as unset. Raises
    ``SettingsError`` listing every problem at once, each naming where the bad value came from.
    """
    cls, title = COMMAND_SETTINGS[command], command_title(command)
    infos = setting_infos(cls)
    env = os.environ if env is None else env
    given_by = "--config"
    if config is None and env.get(CONFIG_ENV, ""):
        config, given_by = Path(env[CONFIG_ENV]), CONFIG_ENV
    given: dict[str, tuple[Any, str, str]] = {}  # setting -> (value, source, how error messages name the source)
    if config is not None:
        if not str(config).strip():
            raise SettingsError(
                "--config is empty. Give the path of a TOML, JSON or YAML settings file, or leave --config out."
            )
        path = Path(config)
        for k, (v, in_table) in _file_values(command, cls, _load_file(path, given_by), path).items():
            given[k] = (v, f"file {path}" + (f" [{command}]" if in_table else ""), f"config key {k!r}")
    unknown = _unknown_env(env)
    if unknown:
        raise SettingsError(
            f"Unknown environment variable{'s' if len(unknown) > 1 else ''} for `dpd {title}`: "
            + "; ".join(unknown)
            + f". Unset {'them' if len(unknown) > 1 else 'it'}, or see `dpd {title} --help` for each setting's variables."
        )
    problems = _ambiguous_env(command, cls, env)
    if problems:
        raise SettingsError(f"Ambiguous environment for `dpd {title}`: " + "; ".join(problems) + ".")
    for name in cls.model_fields:
        for var in reversed(env_names(command, name)):  # shared first, so the command's own wins
            if var is not None and env.get(var, "") != "":
                given[name] = (env[var], f"env {var}", f"env {var}")
    for name, value in flags.items():
        if value is None:
            continue
        if name not in infos:
            raise SettingsError(f"Unknown setting {name!r} for `dpd {title}`.")
        flag = infos[name].flag
        flag = "--no-" + flag[2:] if value is False and infos[name].kind == "bool" else flag  # as typed: --no-dsa
        given[name] = (value, f"flag {flag}", flag)
    try:
        settings = cls.model_validate({name: value for name, (value, _, _) in given.items()})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = err["loc"][0] if err["loc"] else None
            origin = given[loc][2] if loc in given else infos[loc].flag if loc in infos else "settings"
            got = f" (got {err['input']!r})" if loc in given and not isinstance(err.get("input"), dict) else ""
            lines.append(f"{origin}: {err['msg'].removeprefix('Value error, ')}{got}")
        raise SettingsError(
            f"Invalid settings for `dpd {title}`: " + "; ".join(lines) + f". See `dpd {title} --help`."
        ) from None
    sources = {name: given[name][1] if name in given else "default" for name in infos}
    return Resolved(command, settings, sources, Path(config) if config is not None else None)


# --- printing ---------------------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # a float's shortest exact text (1e-05, 1000.0), and TOML's inf and nan
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # deeper than a table: inline
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def dump_toml(data: Mapping[str, Any]) -> str:
    """``data`` as a config file: its plain values first, then one ``[table]`` per mapping (deeper ones inline)."""
    plain = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    tables = [
        f"\n[{k}]\n" + "".join(f"{kk} = {_toml_value(vv)}\n" for kk, vv in v.items())
        for k, v in data.items()
        if isinstance(v, Mapping)
    ]
    return "\n".join(plain) + "\n" + "".join(tables)


def to_toml(resolved: Resolved) -> str:
    """The resolved settings as a TOML file, each value followed by its source as a comment.

    Fed back with ``--config`` it gives the same settings: values are in the command's table, and a
    setting without a value (``None``: its default is computed at run time) is a comment.
    """
    cmd, title = resolved.command, command_title(resolved.command)
    data = resolved.settings.model_dump(mode="json")
    rows: list[tuple[str, str]] = []
    for panel, infos in groupby(by_panel(type(resolved.settings)), key=lambda s: s.panel):
        rows.append((f"# --- {panel}", ""))
        for s in infos:
            line = f"# {s.name}: not set" if data[s.name] is None else f"{s.name} = {_toml_value(data[s.name])}"
            rows.append((line, resolved.sources[s.name]))
    width = max(len(line) for line, src in rows if src)
    head = [
        f"# `dpd {title}` settings; after each value, where it came from.",
        f"# Precedence: flag > DPD_{cmd.upper()}_<SETTING> > DPD_<SETTING> > config file > default.",
        f"# Use as a config file: dpd {title} --config FILE",
        "",
        f"[{cmd}]",
    ]
    return "\n".join(head + [f"{line:<{width}}  # {src}" if src else line for line, src in rows]) + "\n"


def settings_hash(settings: BaseModel, exclude: set[str] | None = None) -> str:
    """Short stable hash of the settings that define a result (paths and devices excluded)."""
    data = settings.model_dump(mode="json", exclude=exclude or set())
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
