"""Settings for every command, and how they are resolved.

Each command has one Pydantic model (``ExpertSettings``, ``DistillSettings``,
``EvalSettings``). A value comes from, lowest to highest precedence:

1. the field default below;
2. a config file (``--config FILE``: TOML, JSON or YAML). Top-level keys apply to every
   command that knows them; a table named after the command (``[distill]``) applies to
   that command only and wins over top-level keys. A key that no command knows is an error;
3. an environment variable ``DPD_<FIELD>`` (``DPD_IPC=10``, ``DPD_PRUNE_RATIO=0.05``);
4. a command-line flag.

Unknown keys are errors and every problem is reported at once. The resolved settings are
saved next to every output (``settings.json``) and inside every safetensors file written.

This module imports neither torch nor anything heavy, so ``dpd --help`` stays instant.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dpd_cli.errors import SettingsError

__all__ = [
    "DATASET_NAMES",
    "MODEL_NAMES",
    "DataFields",
    "ModelFields",
    "ExpertSettings",
    "DistillSettings",
    "EvalSettings",
    "COMMAND_SETTINGS",
    "resolve",
    "settings_hash",
    "env_var",
]

#: Datasets the registry knows (``dpd_cli.data``); kept here so validation needs no torch.
DATASET_NAMES = ("fashion-mnist-mini", "fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "imagefolder")
#: Networks ``dpd_cli.models`` can build.
MODEL_NAMES = ("convnet", "resnet18", "vgg11", "alexnet")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_empty_path(cls, v: Any, info) -> Any:
        # Path("") is the current folder: an empty --out or --data-dir must not silently mean ".".
        if isinstance(v, str) and not v.strip() and "Path" in str(cls.model_fields[info.field_name].annotation):
            raise ValueError("the path is empty; give a path, or leave the setting out for the default")
        return v


class DataFields(_Settings):
    dataset: str = Field(
        "fashion-mnist-mini",
        description=f"Dataset: one of {', '.join(DATASET_NAMES)}.",
    )
    data_dir: Path | None = Field(
        None,
        description="Folder holding the dataset's files (imagefolder: the folder with train/ and test/). "
        "Default: the dpd dataset cache, downloading on first use.",
    )
    zca: bool = Field(False, description="ZCA-whiten images (eps 0.1, fitted on the training set).")
    train_per_class: int | None = Field(
        None, ge=1, description="Use only this many training images per class (seeded, class-balanced)."
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        v = v.lower()
        if v not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {v!r}{_did_you_mean(v, DATASET_NAMES)}; known: {', '.join(DATASET_NAMES)}")
        return v

    @model_validator(mode="after")
    def _imagefolder_needs_dir(self) -> "DataFields":
        if self.dataset == "imagefolder" and self.data_dir is None:
            raise ValueError("dataset 'imagefolder' needs --data-dir pointing at a folder with train/ and test/")
        return self


class ModelFields(_Settings):
    model: str = Field("convnet", description=f"Network: one of {', '.join(MODEL_NAMES)}.")
    width: int = Field(128, ge=1, le=4096, description="ConvNet channels per layer.")
    depth: int | None = Field(None, ge=1, le=8, description="ConvNet depth (default: from the image size).")
    norm: Literal["instance", "batch", "none"] = Field("instance", description="Normalisation layers.")
    pool: Literal["avg", "max"] = Field("avg", description="ConvNet pooling.")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        v = v.lower()
        if v not in MODEL_NAMES:
            raise ValueError(f"unknown model {v!r}{_did_you_mean(v, MODEL_NAMES)}; known: {', '.join(MODEL_NAMES)}")
        return v


class RunFields(_Settings):
    seed: int = Field(0, ge=0, description="Seed for every random choice.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: the cores available).")

    @field_validator("device")
    @classmethod
    def _device_form(cls, v: str) -> str:
        v = v.lower()
        if v not in ("auto", "cpu", "cuda", "mps") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda or cuda:N")
        return v


class ExpertSettings(DataFields, ModelFields, RunFields):
    """``dpd experts``: train expert trajectories on real data."""

    num: int = Field(50, ge=1, description="Number of experts to train.")
    epochs: int = Field(50, ge=1, description="Epochs per expert (one snapshot per epoch).")
    lr: float = Field(0.01, gt=0, description="SGD learning rate.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0, description="SGD weight decay.")
    batch: int = Field(256, ge=1, description="Mini-batch size.")
    dsa: bool = Field(True, description="Differentiable siamese augmentation while training.")
    out: Path | None = Field(None, description="Experts folder (default: <experts root>/<dataset>/<model tag>).")


class DistillSettings(DataFields, ModelFields, RunFields):
    """``dpd distill``: trajectory matching with Difference-Driven Pruning."""

    experts: Path | None = Field(None, description="Experts folder (default: the one `dpd experts` wrote).")
    ipc: int = Field(10, ge=1, description="Synthetic images per class.")
    iterations: int = Field(5000, ge=1, description="Distillation iterations.")
    syn_steps: int = Field(20, ge=1, description="N: student steps on the synthetic set per iteration.")
    expert_epochs: int = Field(2, ge=1, description="M: expert epochs the student must match.")
    max_start_epoch: int = Field(20, ge=1, description="T+: start epochs are drawn from 0..T+-1.")
    lr_img: float = Field(1000.0, gt=0, description="Learning rate of the synthetic pixels.")
    lr_lr: float = Field(1e-5, ge=0, description="Learning rate of the learnable step size alpha.")
    lr_teacher: float = Field(0.01, gt=0, description="Initial student step size alpha_0.")
    batch_syn: int | None = Field(None, ge=1, description="Synthetic mini-batch per student step (default: all).")
    prune_ratio: float = Field(0.01, ge=0, lt=1, description="rho: fraction of parameters pruned from the loss; 0 is MTT.")
    prune_scope: Literal["global", "layer"] = Field("global", description="Rank parameters globally or within each layer.")
    prune_criterion: Literal["abs", "relative"] = Field(
        "abs", description="abs: |student - target|; relative: that divided by |start - target| + eps."
    )
    prune_warmup: int = Field(0, ge=0, description="No pruning during the first K iterations.")
    memory: Literal["full", "low"] = Field(
        "full", description="full: keep the unrolled graph; low: exact recomputation, memory flat in N."
    )
    init: Literal["real", "noise"] = Field("real", description="Initialise images from real samples or noise.")
    dsa: bool = Field(True, description="Differentiable siamese augmentation in student steps.")
    checkpoint_every: int = Field(100, ge=1, description="Iterations between checkpoints.")
    log_every: int | None = Field(
        None, ge=1, description="Iterations between metric flushes, i.e. host syncs (default: 1 on CPU, 10 on GPU)."
    )
    out: Path | None = Field(None, description="Run directory (default: runs/<dataset>-ipc<ipc>-rho<ratio>-s<seed>).")
    resume: bool = Field(False, description="Continue the run in --out from its last checkpoint.")
    force: bool = Field(False, description="Overwrite an existing run in --out.")

    @model_validator(mode="after")
    def _flags_agree(self) -> "DistillSettings":
        if self.resume and self.force:
            raise ValueError("can't use both --resume and --force: --resume continues the run, --force starts it over")
        if self.prune_warmup >= self.iterations and self.prune_ratio > 0:
            raise ValueError(f"--prune-warmup {self.prune_warmup} leaves no pruned iteration of {self.iterations}")
        return self


class EvalSettings(RunFields):
    """``dpd evaluate``: train fresh networks on a synthetic set, test on the real test set."""

    models: list[str] = Field(["convnet"], description="Architectures, comma-separated: " + ", ".join(MODEL_NAMES) + ".")
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
    baseline: list[Literal["random", "full"]] = Field([], description="Also evaluate baselines: random, full.")
    full_epochs: int = Field(20, ge=1, description="E for the full-data baseline (E + 1 epochs run).")
    distilled: bool = Field(True, description="Evaluate the synthetic set itself (--no-distilled: only the baselines).")
    fail_under: float | None = Field(None, ge=0, le=100, description="Exit 3 if a distilled mean accuracy (%) is below this.")
    data_dir: Path | None = Field(None, description="Folder with the dataset's files, if not where the run found them.")

    @field_validator("models", "baseline", mode="before")
    @classmethod
    def _split_commas(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s for s in (p.strip() for p in v.split(",")) if s]
        return v

    @field_validator("models")
    @classmethod
    def _known_models(cls, v: list[str]) -> list[str]:
        out = []
        for name in v:
            name = name.lower()
            if name not in MODEL_NAMES:
                raise ValueError(f"unknown model {name!r}{_did_you_mean(name, MODEL_NAMES)}; known: {', '.join(MODEL_NAMES)}")
            out.append(name)
        if not out:
            raise ValueError("give at least one model")
        return out

    @model_validator(mode="after")
    def _something_to_do(self) -> "EvalSettings":
        if not self.distilled and not self.baseline:
            raise ValueError("--no-distilled leaves nothing to evaluate: add --baseline random and/or full")
        return self


COMMAND_SETTINGS: dict[str, type[_Settings]] = {
    "experts": ExpertSettings,
    "distill": DistillSettings,
    "evaluate": EvalSettings,
}


def env_var(field: str) -> str:
    """The environment variable that sets ``field``: ``prune_ratio`` -> ``DPD_PRUNE_RATIO``."""
    return "DPD_" + field.upper()


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _load_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise SettingsError(f"Config file {path} is a folder. Give the path of a TOML, JSON or YAML settings file.")
    if not path.is_file():
        raise SettingsError(f"Config file {path} does not exist. Check the --config path.")
    text = path.read_text(encoding="utf-8", errors="replace")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise SettingsError(f"{path} is YAML but PyYAML is not installed: `pip install pyyaml`, or use TOML.") from e
            data = yaml.safe_load(text)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            data = tomllib.loads(text)
    except SettingsError:
        raise
    except json.JSONDecodeError as e:
        raise SettingsError(f"Config file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from e
    except Exception as e:  # tomllib.TOMLDecodeError and yaml.YAMLError both say where
        where, problem = _syntax_error_position(e, text)
        raise SettingsError(f"Config file {path} has a syntax error{where}: {problem}. Fix that line and run again.") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsError(f"Config file {path} must hold a table of settings (key = value), not {type(data).__name__}.")
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
        return f" (line {text.count(chr(10)) + 1}, at the end of the file)", msg.replace("(at end of document)", "").strip()
    return "", msg


def _all_known_fields() -> set[str]:
    return {f for cls in COMMAND_SETTINGS.values() for f in cls.model_fields}


def _file_values(command: str, cls: type[_Settings], data: dict[str, Any], path: Path) -> dict[str, Any]:
    fields = cls.model_fields
    known = _all_known_fields()
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in COMMAND_SETTINGS:
                problems.append(f"unknown table [{key}]{_did_you_mean(key, COMMAND_SETTINGS)}; tables: {', '.join(COMMAND_SETTINGS)}")
            continue
        norm = key.replace("-", "_")
        if norm in fields:
            values[norm] = value
        elif norm not in known:
            problems.append(f"unknown key {key!r}{_did_you_mean(norm, known)}")
    for key, value in (data.get(command) or {}).items():
        norm = key.replace("-", "_")
        if norm in fields:
            values[norm] = value
        else:
            problems.append(f"unknown key {key!r} in [{command}]{_did_you_mean(norm, fields)}")
    if problems:
        raise SettingsError(f"Config file {path}: " + "; ".join(problems) + ". Run `dpd " + command + " --help` for the valid settings.")
    return values


def resolve(
    command: str,
    flags: Mapping[str, Any],
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
):
    """Resolve one command's settings: defaults < config file < ``DPD_*`` env < flags.

    Args:
        command: ``experts``, ``distill`` or ``evaluate``.
        flags: Values given on the command line; ``None`` means "not given".
        config: Optional config file.
        env: Environment (default ``os.environ``).

    Returns:
        The validated settings model.

    Raises:
        SettingsError: Every problem at once, each naming where the bad value came from.
    """
    cls = COMMAND_SETTINGS[command]
    env = os.environ if env is None else env
    sources: dict[str, str] = {}
    merged: dict[str, Any] = {}
    if config is not None:
        if not str(config).strip():
            raise SettingsError("--config is empty. Give the path of a TOML, JSON or YAML settings file, or leave --config out.")
        for k, v in _file_values(command, cls, _load_file(Path(config)), Path(config)).items():
            merged[k] = v
            sources[k] = f"config key {k!r}"
    for name in cls.model_fields:
        var = env_var(name)
        if var in env and env[var] != "":
            merged[name] = env[var]
            sources[name] = f"env {var}"
    for name, value in flags.items():
        if value is None:
            continue
        if name not in cls.model_fields:
            raise SettingsError(f"Unknown setting {name!r} for `dpd {command}`.")
        merged[name] = value
        sources[name] = _flag(name)
    try:
        return cls.model_validate(merged)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = err["loc"][0] if err["loc"] else None
            if loc is None or loc not in cls.model_fields and loc not in sources:
                where = "settings"
            else:
                where = sources.get(loc, _flag(loc))
            msg = err["msg"].removeprefix("Value error, ")
            got = f" (got {err['input']!r})" if loc in sources and not isinstance(err.get("input"), dict) else ""
            lines.append(f"{where}: {msg}{got}")
        raise SettingsError(
            "Invalid settings for `dpd " + command + "`: " + "; ".join(lines) + f". See `dpd {command} --help`."
        ) from None


def settings_hash(settings: BaseModel, exclude: set[str] | None = None) -> str:
    """Short stable hash of the settings that define a result (paths and devices excluded)."""
    data = settings.model_dump(mode="json", exclude=exclude or set())
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
