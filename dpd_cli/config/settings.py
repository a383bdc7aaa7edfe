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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dpd_cli.errors import SettingsError
from dpd_cli.models import MODEL_NAMES

#: Datasets the registry knows (``dpd_cli.data``); kept here so validation needs no torch.
DATASET_NAMES = (
    "fashion-mnist-mini",
    "fashion-mnist",
    "mnist",
    "cifar10",
    "cifar100",
    "svhn",
    "tiny-imagenet",
    "imagefolder",
)
#: Why ``--device mps`` is refused (here and by ``recipes.runtime.resolve_device``); see docs/guide.md.
MPS_REFUSED = (
    "mps is not supported: Apple's MPS backend has no float64, and dpd builds float64 tensors on the device "
    "(for example to total the pruning counts per layer). Use --device cpu; on a Mac, --device auto picks the CPU."
)
#: ``--help`` panels in the order they are printed; a panel not listed here comes after them.
PANELS = ("Data", "Distillation", "Pruning", "Memory", "Training", "Evaluation", "Model", "Output", "Run")
#: The variable that names a config file when ``--config`` is not given.
CONFIG_ENV = "DPD_CONFIG"
#: What ``dpd export --format`` writes (``dpd_cli.artifacts.export``).
EXPORT_FORMATS = ("mtt", "datm", "imagefolder", "npz")
_DATA, _PRUNING, _MEMORY, _OUTPUT = ({"panel": p} for p in ("Data", "Pruning", "Memory", "Output"))
_SHARED_DATA = {"panel": "Data", "shared": True}
_DATA_DIR_HELP = (
    "Dataset folder (imagefolder: with train/ and test/; default: the dpd cache, downloading on first use)."
)
#: Datasets read from a folder the user names, and what that folder is.
_FOLDER_DATASETS = {
    "imagefolder": "a folder with train/ and test/",
    "tiny-imagenet": "the unpacked tiny-imagenet-200 folder",
}


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
        if s.literal and s.kind == "choice":
            v = _choose(v, s)
        elif s.literal and isinstance(v, list):
            v = [_choose(x, s) for x in v]
        return v


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

    dataset: Literal[DATASET_NAMES] = Field("fashion-mnist-mini", description="Dataset to train on.")
    data_dir: Path | None = Field(None, description=_DATA_DIR_HELP)
    zca: bool = Field(
        False, description="ZCA-whiten images as MTT (eps 0.1, fitted on the raw [0, 1] training pixels)."
    )
    train_per_class: int | None = Field(
        None, ge=1, description="Use only this many training images per class (seeded, class-balanced)."
    )
    val_per_class: int | None = Field(
        None,
        ge=1,
        description="Hold out this many training images per class as a validation split, never trained on (needed "
        "by evaluate --select val).",
    )

    @model_validator(mode="after")
    def _folder_datasets_need_dir(self) -> DataFields:
        if self.dataset in _FOLDER_DATASETS and self.data_dir is None:
            raise ValueError(f"dataset {self.dataset!r} needs --data-dir pointing at {_FOLDER_DATASETS[self.dataset]}")
        return self


class ModelFields(_Settings):
    panel: ClassVar[str] = "Model"

    model: Literal[MODEL_NAMES] = Field("convnet", description="Network architecture.")
    width: int = Field(128, ge=1, le=4096, description="ConvNet channels per layer.")
    depth: int | None = Field(None, ge=1, le=8, description="ConvNet depth (default: from the image size).")
    norm: Literal["instance", "batch", "none"] = Field("instance", description="Normalisation layers.")
    pool: Literal["avg", "max"] = Field("avg", description="ConvNet pooling.")


class RunFields(_Settings):
    panel: ClassVar[str] = "Run"

    seed: int = Field(0, ge=0, description="Seed for every random choice.")
    device: str = Field(
        "auto",
        description="Device to run on (auto: the first CUDA GPU if there is one, else the CPU).",
        json_schema_extra={"choices": ["auto", "cpu", "cuda", "cuda:N"]},
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: the cores available).")
    host_memory: Literal["reuse", "system"] = Field(
        "reuse",
        description="CPU allocator: reuse keeps freed tensor memory in the process (faster, somewhat higher peak RSS); "
        "system returns it after every use. Only on glibc Linux.",
    )
    deterministic: bool = Field(
        False,
        description="On a GPU, use cuDNN's deterministic algorithms so that runs repeat (distillation only to rounding). "
        "Can be slower.",
    )
    dist_timeout: float = Field(300.0, gt=0, description="Under torchrun: seconds a rank waits for the others.")

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

    num: int = Field(50, ge=1, description="Number of experts to train.")
    epochs: int = Field(50, ge=1, description="Epochs per expert (one snapshot per epoch).")
    lr: float = Field(0.01, gt=0, description="SGD learning rate.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0, description="SGD weight decay.")
    batch: int = Field(256, ge=1, description="Mini-batch size.")
    dsa: bool = Field(True, description="Differentiable siamese augmentation while training.")
    out: Path | None = Field(
        None, description="Experts folder (default: <experts root>/<dataset>/<model tag>).", json_schema_extra=_OUTPUT
    )


class DistillSettings(DataFields, ModelFields, RunFields):
    """``dpd distill``: trajectory matching with Difference-Driven Pruning."""

    panel: ClassVar[str] = "Distillation"

    experts: Path | None = Field(
        None,
        description="Experts folder (default: the newest fitting one under the experts root); its dataset and network "
        "settings apply unless given.",
        json_schema_extra=_DATA,
    )
    ipc: int = Field(10, ge=1, description="Synthetic images per class.")
    iterations: int = Field(5000, ge=1, description="Distillation iterations.")
    syn_steps: int = Field(20, ge=1, description="N: student steps on the synthetic set per iteration.")
    expert_epochs: int = Field(2, ge=1, description="M: expert epochs the student must match.")
    max_start_epoch: int = Field(20, ge=1, description="T+: start epochs are drawn from 0..T+-1.")
    lr_img: float = Field(1000.0, gt=0, description="Learning rate of the synthetic pixels.")
    lr_lr: float = Field(1e-5, ge=0, description="Learning rate of the learnable step size alpha.")
    lr_teacher: float = Field(0.01, gt=0, description="Initial student step size alpha_0.")
    batch_syn: int | None = Field(None, ge=1, description="Synthetic mini-batch per student step (default: all).")
    prune_ratio: float = Field(
        0.01, ge=0, lt=1, description="rho: fraction pruned from the loss; 0 is MTT.", json_schema_extra=_PRUNING
    )
    prune_scope: Literal["global", "layer"] = Field(
        "global", description="Rank parameters globally or within each layer.", json_schema_extra=_PRUNING
    )
    prune_criterion: Literal["abs", "relative", "layer-z", "layer-rank"] = Field(
        "abs",
        description="Score ranking parameters: abs |student - target|; relative: abs / (|start - target| + eps); "
        "layer-z: abs standardised per layer; layer-rank: abs's rank in its layer / layer size.",
        json_schema_extra=_PRUNING,
    )
    prune_direction: Literal["largest", "smallest"] = Field(
        "largest", description="Prune the largest scores (DPD) or the smallest (PAD).", json_schema_extra=_PRUNING
    )
    prune_mask: Literal["step", "ema"] = Field(
        "step", description="Mask from this iteration's scores or their moving average.", json_schema_extra=_PRUNING
    )
    prune_ema_beta: float | None = Field(
        None,
        description="With --prune-mask ema: the average's weight of the past (default 0.9).",
        json_schema_extra=_PRUNING,
    )
    prune_mode: Literal["loss", "network"] = Field(
        "loss",
        description="loss: prune from the loss only; network: also freeze pruned parameters at the expert's start.",
        json_schema_extra=_PRUNING,
    )
    prune_warmup: int = Field(
        0, ge=0, description="No pruning during the first K iterations.", json_schema_extra=_PRUNING
    )
    memory: Literal["full", "low"] = Field(
        "full",
        description="full: keep the unrolled graph; low: recompute it, memory flat in N.",
        json_schema_extra=_MEMORY,
    )
    keep_graphs: int = Field(
        0,
        ge=0,
        description="With --memory low: keep the last K of the N steps' graphs instead of recomputing them (K = N: "
        "full's memory and time).",
        json_schema_extra=_MEMORY,
    )
    cuda_graphs: bool = Field(
        True,
        description="On a GPU, replay one iteration's meta-gradient as a CUDA graph once checked against eager mode. "
        "Not under torchrun, --prune-mask ema or --prune-mode network.",
        json_schema_extra=_MEMORY,
    )
    init: Literal["real", "real-correct", "noise"] = Field(
        "real",
        description="Initial images: real samples, real samples the label expert gets right (with --soft-labels), or noise.",
    )
    soft_labels: bool = Field(
        False,
        description="Learn soft labels too (DATM): logits from an expert on the initial images, trained by the "
        "meta-gradient.",
    )
    label_epoch: int | None = Field(
        None,
        ge=0,
        description="With --soft-labels: the epoch of expert 0 whose logits initialise the labels (default: its last).",
    )
    lr_y: float = Field(2.0, gt=0, description="With --soft-labels: learning rate of the label logits (SGD).")
    momentum_y: float = Field(0.9, ge=0, lt=1, description="With --soft-labels: SGD momentum of the label logits.")
    dsa: bool = Field(True, description="Differentiable siamese augmentation in student steps.")
    checkpoint_every: int = Field(100, ge=1, description="Iterations between checkpoints.", json_schema_extra=_OUTPUT)
    keep_checkpoints: Literal["latest", "all"] | int = Field(
        "latest",
        description="Checkpoints kept besides checkpoint 0 and the newest two, for evaluate --select: latest (none), "
        "all, or N (every N-th).",
        json_schema_extra=_OUTPUT,
    )
    log_every: int | None = Field(
        None,
        ge=1,
        description="Iterations between metric flushes (default: 1 on CPU, 10 on GPU).",
        json_schema_extra=_OUTPUT,
    )
    out: Path | None = Field(
        None,
        description="Run directory (default: named after dataset, IPC, ratio and seed, e.g. runs/cifar10-ipc10-rho0.01-s0).",
        json_schema_extra=_OUTPUT,
    )
    resume: bool = Field(
        False, description="Continue the run in --out from its last checkpoint.", json_schema_extra=_OUTPUT
    )
    force: bool = Field(False, description="Overwrite an existing run in --out.", json_schema_extra=_OUTPUT)

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
                f"--keep-graphs {self.keep_graphs} is more than the {self.syn_steps} steps of the unroll "
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

    models: list[Literal[MODEL_NAMES]] = Field(["convnet"], description="Architectures to train.")
    runs: int = Field(5, ge=1, description="Networks trained per architecture.")
    protocol: Literal["mtt", "fixed"] = Field(
        "mtt", description="MTT's evaluation loop; mtt: E = 1000 at the learned alpha; fixed: E = 300 at lr 0.01."
    )
    epochs: int | None = Field(None, ge=1, description="Override the protocol's E (E + 1 epochs run, as in MTT).")
    lr: float | None = Field(None, gt=0, description="Override the protocol's learning rate.")
    batch: int = Field(256, ge=1, description="Mini-batch size.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay.")
    dsa: bool = Field(True, description="DSA while training the evaluation networks.")
    baseline: list[Literal["random", "full", "init"]] = Field(
        [],
        description="Also evaluate baselines: random (real images, same IPC), full (all training images), init (the run's "
        "initial images).",
    )
    select: Literal["val", "final", "test-max"] | None = Field(
        None,
        description="Checkpoint to report: val (best on the validation split; default when there is one), final, or "
        "test-max (best on the test set: optimistic).",
    )
    full_epochs: int = Field(20, ge=1, description="E for the full-data baseline (E + 1 epochs run).")
    distilled: bool = Field(True, description="Evaluate the synthetic set itself (--no-distilled: only the baselines).")
    fail_under: float | None = Field(
        None,
        ge=0,
        le=100,
        description="Exit 3 if a distilled mean accuracy is below this percentage.",
        json_schema_extra=_OUTPUT,
    )
    data_dir: Path | None = Field(
        None,
        description="Folder with the dataset's files, if not where the run found them.",
        json_schema_extra=_SHARED_DATA,
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

    dataset: Literal[DATASET_NAMES] | None = Field(
        None,
        description="Dataset the buffers' experts were trained on (required).",
        json_schema_extra=_SHARED_DATA,
    )
    data_dir: Path | None = Field(None, description=_DATA_DIR_HELP, json_schema_extra=_SHARED_DATA)
    zca: bool | None = Field(
        None,
        description="Required: whether the buffers were trained on ZCA-whitened images (MTT's --zca).",
        json_schema_extra=_SHARED_DATA,
    )
    model: Literal["convnet"] = Field(
        "convnet",
        description="Network the buffers hold (MTT's ConvNet).",
        json_schema_extra={"panel": "Model", "shared": True},
    )
    lr: float | None = Field(
        None, gt=0, description="The experts' SGD learning rate, if you know it (recorded, not checked)."
    )
    momentum: float | None = Field(
        None, ge=0, lt=1, description="The experts' SGD momentum, if you know it (recorded)."
    )
    weight_decay: float | None = Field(
        None, ge=0, description="The experts' SGD weight decay, if you know it (recorded)."
    )
    batch: int | None = Field(None, ge=1, description="The experts' mini-batch size, if you know it (recorded).")
    dsa: bool | None = Field(None, description="Whether the experts were trained with DSA, if you know it (recorded).")
    out: Path | None = Field(
        None,
        description="Experts folder to write (default: <experts root>/<dataset>/<model tag>[-zca]-imported).",
        json_schema_extra=_OUTPUT,
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for torch (default: the cores available).",
        json_schema_extra={"panel": "Run", "shared": True},
    )

    @model_validator(mode="after")
    def _folder_datasets_need_dir(self) -> ImportSettings:
        if self.dataset in _FOLDER_DATASETS and self.data_dir is None:
            raise ValueError(f"dataset {self.dataset!r} needs --data-dir pointing at its folder")
        return self


class ExportSettings(_Settings):
    """``dpd export``: write a synthetic set in the files other tools read."""

    panel: ClassVar[str] = "Output"

    format: Literal[EXPORT_FORMATS] | None = Field(
        None,
        description="Required. mtt / datm: images_best.pt, labels_best.pt, lr_best.pt and the ZCA transform; "
        "imagefolder: PNGs <class>/<i>.png; npz: one NumPy archive.",
    )
    out: Path | None = Field(None, description="Folder to write (required; refused if it exists, unless --force).")
    # As distill's --force: replace what --out holds.
    force: bool = Field(
        False,
        description="Replace --out if it holds an earlier export (or is empty).",
        json_schema_extra={"shared": True},
    )


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
        out[name] = SettingInfo(
            name=name,
            kind=kind,
            literal=literal,
            choices=tuple(str(c) for c in literal or extra.get("choices", ())),
            panel=str(extra.get("panel") or owner.__dict__.get("panel") or _Settings.panel),
            description=f.description or "",
            default=f.get_default(call_default_factory=True),
            declared_by=owner,
            shared=bool(extra.get("shared")),
        )
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


# --- config files -----------------------------------------------------------------------------
def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse(path: Path, text: str) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return json.loads(text)
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise SettingsError(
                f"{path} is YAML but PyYAML is not installed: `pip install pyyaml`, or use TOML."
            ) from e
        return yaml.safe_load(text)
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


def _load_file(path: Path, given_by: str) -> dict[str, Any]:
    if path.is_dir():
        raise SettingsError(f"Config file {path} is a folder. Give the path of a TOML, JSON or YAML settings file.")
    if not path.is_file():
        raise SettingsError(f"Config file {path} does not exist. Check the {given_by} path.")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = _parse(path, text)
    except SettingsError:
        raise
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
            if key not in COMMAND_SETTINGS:
                tables = ", ".join(COMMAND_SETTINGS)
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
    cls = COMMAND_SETTINGS[command]
    title = command_title(command)
    env = os.environ if env is None else env
    given_by = "--config"
    if config is None and env.get(CONFIG_ENV, ""):
        config, given_by = Path(env[CONFIG_ENV]), CONFIG_ENV
    sources: dict[str, str] = {}
    where: dict[str, str] = {}  # how error messages name a value's origin
    merged: dict[str, Any] = {}
    if config is not None:
        if not str(config).strip():
            raise SettingsError(
                "--config is empty. Give the path of a TOML, JSON or YAML settings file, or leave --config out."
            )
        path = Path(config)
        for k, (v, in_table) in _file_values(command, cls, _load_file(path, given_by), path).items():
            merged[k] = v
            sources[k] = f"file {path}" + (f" [{command}]" if in_table else "")
            where[k] = f"config key {k!r}"
    problems = _ambiguous_env(command, cls, env)
    if problems:
        raise SettingsError(f"Ambiguous environment for `dpd {title}`: " + "; ".join(problems) + ".")
    for name in cls.model_fields:
        for var in reversed(env_names(command, name)):  # shared first, so the command's own wins
            if var is not None and env.get(var, "") != "":
                merged[name] = env[var]
                sources[name] = where[name] = f"env {var}"
    infos = setting_infos(cls)
    for name, value in flags.items():
        if value is None:
            continue
        if name not in cls.model_fields:
            raise SettingsError(f"Unknown setting {name!r} for `dpd {title}`.")
        merged[name] = value
        # A switch is named as typed: --no-dsa for False.
        flag = infos[name].flag
        where[name] = "--no-" + flag[2:] if value is False and infos[name].kind == "bool" else flag
        sources[name] = f"flag {where[name]}"
    try:
        settings = cls.model_validate(merged)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = err["loc"][0] if err["loc"] else None
            if loc is None or loc not in cls.model_fields and loc not in where:
                origin = "settings"
            else:
                origin = where.get(loc, infos[loc].flag)
            msg = err["msg"].removeprefix("Value error, ")
            got = f" (got {err['input']!r})" if loc in where and not isinstance(err.get("input"), dict) else ""
            lines.append(f"{origin}: {msg}{got}")
        raise SettingsError(
            f"Invalid settings for `dpd {title}`: " + "; ".join(lines) + f". See `dpd {title} --help`."
        ) from None
    sources = {name: sources.get(name, "default") for name in cls.model_fields}
    return Resolved(command, settings, sources, Path(config) if config is not None else None)


# --- printing ---------------------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # a float's shortest exact text (1e-05, 1000.0), and TOML's inf and nan
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


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
