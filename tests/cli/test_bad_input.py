"""Every user mistake through the CLI: exit code 2, one paragraph naming the problem and the fix, no traceback.

One table-driven test. A case is ``(id, argv, setup, expected substrings)``; ``argv`` and the
expected texts may use ``{tmp}`` (the test's folder), ``{experts}`` (tiny experts, shared by
the module, never written to) and ``{run}`` (a tiny finished distillation, likewise shared).
Setups that change files work on copies under ``{tmp}``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dpd_cli.cli.app import app
from tests.cli.conftest import DISTILL_TINY, TINY

DISTILL = [*DISTILL_TINY, *TINY]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """Tiny experts (10 classes, 2 experts x 3 epochs) and a finished 4-iteration run."""
    root = tmp_path_factory.mktemp("shared")
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPD_CACHE_ROOT", str(root / "cache"))
        r = runner.invoke(app, ["experts", "--num", "2", "--epochs", "3", "--out", str(root / "ex"), "--quiet", *TINY])
        assert r.exit_code == 0, r.output
        r = runner.invoke(
            app, ["distill", "--experts", str(root / "ex"), "--out", str(root / "run"), "--quiet", *DISTILL]
        )
        assert r.exit_code == 0, r.output
    return {"experts": root / "ex", "run": root / "run"}


# ----------------------------------------------------------------------------------------------
# Setups: each gets (tmp, shared) and prepares files under tmp.


def _write(name: str, text: str) -> Callable:
    def setup(tmp: Path, shared: dict) -> None:
        (tmp / name).write_text(text)

    return setup


def _mkdirs(*names: str) -> Callable:
    def setup(tmp: Path, shared: dict) -> None:
        for n in names:
            (tmp / n).mkdir(parents=True)

    return setup


def _image_folder(name: str, classes: list[str], side: int = 28) -> Callable:
    def setup(tmp: Path, shared: dict) -> None:
        from PIL import Image

        g = torch.Generator().manual_seed(0)
        for split in ("train", "test"):
            for c in classes:
                (tmp / name / split / c).mkdir(parents=True)
                for i in range(2):
                    arr = torch.randint(0, 256, (side, side), generator=g, dtype=torch.uint8).numpy()
                    Image.fromarray(arr, "L").save(tmp / name / split / c / f"{i}.png")

    return setup


def _both(*setups: Callable) -> Callable:
    def setup(tmp: Path, shared: dict) -> None:
        for s in setups:
            s(tmp, shared)

    return setup


def _rewrite(path: Path, out: Path, **meta_changes) -> None:
    """Copy a safetensors file with metadata entries replaced (values are the raw strings)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    save_file(load_file(str(path)), str(out), metadata=meta)


def _copy(key: str, name: str) -> Callable:
    def setup(tmp: Path, shared: dict) -> None:
        shutil.copytree(shared[key], tmp / name)

    return setup


def _synthetic_v99(tmp: Path, shared: dict) -> None:
    _rewrite(shared["run"] / "synthetic.safetensors", tmp / "v99.safetensors", format_version="99")


def _run_checkpoints_v99(tmp: Path, shared: dict) -> None:
    shutil.copytree(shared["run"], tmp / "run99")
    for ckpt in (tmp / "run99" / "checkpoints").glob("*.safetensors"):
        _rewrite(ckpt, ckpt, format_version="99")


def _experts_manifest_v99(tmp: Path, shared: dict) -> None:
    shutil.copytree(shared["experts"], tmp / "ex99")
    m = json.loads((tmp / "ex99" / "experts.json").read_text())
    m["format_version"] = 99
    (tmp / "ex99" / "experts.json").write_text(json.dumps(m))


def _trajectory_v99(tmp: Path, shared: dict) -> None:
    shutil.copytree(shared["experts"], tmp / "ex99")
    p = tmp / "ex99" / "expert_00001.safetensors"
    _rewrite(p, p, format_version="99")


def _synthetic_as_imagefolder(classes: list[str] | None = None) -> Callable:
    """The run's synthetic set (10 Fashion-MNIST classes), relabelled as coming from an image folder."""

    def setup(tmp: Path, shared: dict) -> None:
        src = shared["run"] / "synthetic.safetensors"
        with safe_open(str(src), framework="pt") as f:
            meta = f.metadata()
        changes = {"dataset": json.dumps("imagefolder")}
        if classes is not None:
            changes["classes"] = json.dumps(classes)
        _rewrite(src, tmp / "syn.safetensors", **changes)
        assert json.loads(meta["dataset"]) == "fashion-mnist-mini"

    return setup


def _truncate_synthetic(tmp: Path, shared: dict) -> None:
    data = (shared["run"] / "synthetic.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])


FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
TEN_OTHER = [f"c{i}" for i in range(10)]


class Case(NamedTuple):
    id: str
    argv: list[str]
    expected: list[str]
    setup: Callable | None = None
    env: dict[str, str] | None = None


D = DISTILL  # the tiny distillation flags, for brevity in the table
CASES = [
    # --- unknown flags and keys ---------------------------------------------------------------
    Case("unknown-flag", ["distill", "--bogus"], ["No such option: --bogus"]),
    Case(
        "unknown-config-key",
        ["distill", "--config", "{tmp}/c.toml"],
        ["Config file {tmp}/c.toml: unknown key 'ipcc' (did you mean 'ipc'?)", "`dpd distill --help`"],
        _write("c.toml", "ipcc = 1\n"),
    ),
    Case(
        "unknown-config-table",
        ["distill", "--config", "{tmp}/c.toml"],
        ["unknown table [distil] (did you mean 'distill'?)"],
        _write("c.toml", "[distil]\nipc = 1\n"),
    ),
    # --- out-of-range and wrongly typed values --------------------------------------------------
    Case(
        "ipc-zero",
        ["distill", "--ipc", "0"],
        ["Invalid settings for `dpd distill`: --ipc: Input should be greater than or equal to 1 (got 0)"],
    ),
    Case(
        "prune-ratio-one", ["distill", "--prune-ratio", "1.0"], ["--prune-ratio: Input should be less than 1 (got 1.0)"]
    ),
    Case(
        "prune-ratio-negative",
        ["distill", "--prune-ratio", "-0.1"],
        ["--prune-ratio: Input should be greater than or equal to 0 (got -0.1)"],
    ),
    Case(
        "experts-negative-epochs",
        ["experts", "--epochs", "-1"],
        ["--epochs: Input should be greater than or equal to 1 (got -1)"],
    ),
    Case(
        "evaluate-negative-epochs",
        ["evaluate", "{run}", "--epochs", "-5"],
        ["--epochs: Input should be greater than or equal to 1 (got -5)"],
    ),
    Case(
        "fail-under-above-100",
        ["evaluate", "{run}", "--fail-under", "150"],
        ["--fail-under: Input should be less than or equal to 100"],
    ),
    Case(
        "fail-under-fraction",
        ["evaluate", "{run}", "--fail-under", "0.6"],
        [
            "--fail-under: the threshold is a percentage (0-100), and 0.6 looks like a fraction: for 60 % give 60 (got 0.6)"
        ],
    ),
    Case(
        "prune-warmup-covers-all",
        ["distill", "--iterations", "5", "--prune-warmup", "5"],
        ["--prune-warmup 5 leaves no pruned iteration of 5"],
    ),
    Case(
        "prune-ema-beta-without-ema",
        ["distill", "--prune-ema-beta", "0.5"],
        ["--prune-ema-beta is the moving average's weight: it needs --prune-mask ema (the mask is 'step')"],
    ),
    Case(
        "prune-ema-beta-one",
        ["distill", "--prune-mask", "ema", "--prune-ema-beta", "1"],
        ["--prune-ema-beta must lie in [0, 1) (got 1)"],
    ),
    Case(
        "keep-graphs-with-full-memory",
        ["distill", "--keep-graphs", "4"],
        ["--keep-graphs 4 is for --memory low (full memory keeps every step's graph already): add --memory low"],
    ),
    Case(
        "keep-graphs-above-steps",
        ["distill", "--memory", "low", "--syn-steps", "5", "--keep-graphs", "6"],
        ["--keep-graphs 6 is more than the 5 steps of the unroll (--syn-steps): use at most 5"],
    ),
    Case(
        "prune-criterion-typo",
        ["distill", "--prune-criterion", "layerz"],
        [
            "--prune-criterion: unknown prune criterion 'layerz' (did you mean 'layer-z'?); known: abs, relative, layer-z, layer-rank"
        ],
    ),
    Case(
        "prune-direction-typo",
        ["distill", "--prune-direction", "biggest"],
        ["--prune-direction: unknown prune direction 'biggest'", "known: largest, smallest"],
    ),
    Case(
        "prune-mode-typo",
        ["distill", "--prune-mode", "model"],
        ["--prune-mode: unknown prune mode 'model'", "known: loss, network"],
    ),
    Case(
        "prune-mask-typo",
        ["distill", "--prune-mask", "average"],
        ["--prune-mask: unknown prune mask 'average'", "known: step, ema"],
    ),
    Case(
        "keep-checkpoints-zero",
        ["distill", "--keep-checkpoints", "0"],
        [
            "--keep-checkpoints: keep 0 of the checkpoints? Use latest, all, or a positive N to keep every N-th (got '0')"
        ],
    ),
    Case(
        "keep-checkpoints-word",
        ["distill", "--keep-checkpoints", "some"],
        ["--keep-checkpoints: use latest, all, or a positive N to keep every N-th checkpoint (got 'some')"],
    ),
    Case(
        "val-split-larger-than-a-class",
        ["experts", "--val-per-class", "500", "--out", "{tmp}/ex", *TINY[:4], "--threads", "1"],
        ["--val-per-class 500 would leave no training image of class 'T-shirt/top', which has 500. Use at most 499"],
    ),
    Case(
        "val-split-differs-from-experts",
        ["distill", "--experts", "{experts}", "--out", "{tmp}/r", *DISTILL, "--val-per-class", "5"],
        ["do not fit these settings (val_per_class: experts have None, settings give 5)"],
    ),
    Case("resume-and-force", ["distill", "--resume", "--force"], ["can't use both --resume and --force"]),
    Case(
        "config-key-wrong-type",
        ["distill", "--config", "{tmp}/c.toml"],
        ["config key 'ipc': Input should be a valid integer, unable to parse string as an integer (got 'ten')"],
        _write("c.toml", 'ipc = "ten"\n'),
    ),
    Case(
        "config-key-list-for-int",
        ["distill", "--config", "{tmp}/c.yaml"],
        ["config key 'width': Input should be a valid integer (got [1, 2])"],
        _write("c.yaml", "width: [1, 2]\n"),
    ),
    Case(
        "env-wrong-type",
        ["distill"],
        ["env DPD_IPC: Input should be a valid integer, unable to parse string as an integer (got 'x')"],
        env={"DPD_IPC": "x"},
    ),
    Case(
        "unknown-device",
        ["distill", "--device", "tpu"],
        ["--device: unknown device 'tpu'; use auto, cpu, cuda or cuda:N"],
    ),
    Case(
        "unknown-protocol",
        ["evaluate", "{run}", "--protocol", "MTX"],
        ["--protocol: unknown protocol 'mtx' (did you mean 'mtt'?); known: mtt, fixed (got 'MTX')"],
    ),
    Case(
        "world-size-without-torchrun",
        ["distill", "--experts", "{experts}", "--out", "{tmp}/r", *D],
        ["WORLD_SIZE is 2 but there is no rendezvous address (MASTER_ADDR)", "Start it with torchrun"],
        env={"WORLD_SIZE": "2", "RANK": "0"},
    ),
    Case(
        "env-unknown-variable",
        ["distill", *D],
        [
            "Unknown environment variable for `dpd distill`: DPD_DISTIL_IPC is not a dpd variable "
            "(did you mean 'DPD_DISTILL_IPC'?). Unset it, or see `dpd distill --help` for each setting's variables."
        ],
        env={"DPD_DISTIL_IPC": "3"},
    ),
    Case(
        "shared-env-of-colliding-setting",
        ["distill", *D],
        [
            "DPD_OUT is set, but 'out' means different things in `dpd distill`, "
            "`dpd experts`, `dpd experts import` and `dpd export`: set "
            "DPD_DISTILL_OUT instead"
        ],
        env={"DPD_OUT": "{tmp}/r"},
    ),
    Case(
        "config-from-env-missing",
        ["distill"],
        ["Config file {tmp}/nope.toml does not exist. Check the DPD_CONFIG path."],
        env={"DPD_CONFIG": "{tmp}/nope.toml"},
    ),
    Case(
        "depth-too-deep",
        ["experts", "--depth", "6", "--width", "8", "--out", "{tmp}/ex"],
        ["--depth 6 is too deep for 28x28 images: use at most 5"],
    ),
    # --- unknown dataset / model ---------------------------------------------------------------
    Case(
        "unknown-dataset",
        ["experts", "--dataset", "cifar11"],
        ["--dataset: unknown dataset 'cifar11' (did you mean 'cifar10'?); known: fashion-mnist-mini"],
    ),
    Case(
        "unknown-model",
        ["distill", "--model", "resnet"],
        ["--model: unknown model 'resnet' (did you mean 'resnet18'?)"],
    ),
    Case(
        "unknown-evaluate-model",
        ["evaluate", "{run}", "--models", "convnet,vgg"],
        ["--models: unknown model 'vgg' (did you mean 'vgg11'?)"],
    ),
    # --- missing or empty paths ------------------------------------------------------------------
    Case(
        "data-dir-empty",
        ["experts", "--data-dir", ""],
        ["--data-dir: the path is empty; give a path, or leave the setting out for the default (got '')"],
    ),
    Case("out-empty", ["distill", "--out", ""], ["--out: the path is empty"]),
    Case("experts-path-empty", ["distill", "--experts", " "], ["--experts: the path is empty"]),
    Case(
        "config-path-empty",
        ["distill", "--config", ""],
        ["--config is empty. Give the path of a TOML, JSON or YAML settings file"],
    ),
    Case(
        "evaluate-target-empty",
        ["evaluate", ""],
        ["The target is empty. Give a run directory (from `dpd distill`) or a synthetic.safetensors file."],
    ),
    Case(
        "data-dir-missing",
        ["experts", "--data-dir", "{tmp}/nowhere", *TINY],
        ["--data-dir {tmp}/nowhere does not exist. Point it at the folder holding the fashion-mnist-mini files."],
    ),
    Case(
        "evaluate-target-missing", ["evaluate", "{tmp}/nowhere"], ["{tmp}/nowhere does not exist. Give a run directory"]
    ),
    Case(
        "evaluate-experts-folder",
        ["evaluate", "{experts}"],
        [
            "{experts} is an experts folder (from `dpd experts`): it holds training trajectories, not a synthetic set. "
            "Distil one from it with `dpd distill --experts {experts}`, then evaluate the run directory"
        ],
    ),
    Case(
        "evaluate-folder-without-run",
        ["evaluate", "{tmp}/empty"],
        ["{tmp}/empty has no synthetic.safetensors", "dpd distill --out {tmp}/empty"],
        _mkdirs("empty"),
    ),
    Case(
        "config-missing",
        ["distill", "--config", "{tmp}/nope.toml"],
        ["Config file {tmp}/nope.toml does not exist. Check the --config path."],
    ),
    Case(
        "config-is-a-folder",
        ["distill", "--config", "{tmp}/empty"],
        ["Config file {tmp}/empty is a folder."],
        _mkdirs("empty"),
    ),
    # --- a --data-dir without the expected files ------------------------------------------------
    Case(
        "mnist-data-dir-without-files",
        ["experts", "--dataset", "mnist", "--data-dir", "{tmp}/empty", *TINY],
        [
            "{tmp}/empty does not hold the mnist files: missing train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]",
            "Point --data-dir at the folder with the four IDX files",
        ],
        _mkdirs("empty"),
    ),
    Case(
        "cifar10-data-dir-without-files",
        ["experts", "--dataset", "cifar10", "--data-dir", "{tmp}/empty", *TINY],
        ["--data-dir {tmp}/empty does not hold the cifar10 files: expected cifar-10-batches-py/"],
        _mkdirs("empty"),
    ),
    Case(
        "svhn-data-dir-without-files",
        ["experts", "--dataset", "svhn", "--data-dir", "{tmp}/empty", *TINY],
        ["expected train_32x32.mat and test_32x32.mat"],
        _mkdirs("empty"),
    ),
    Case(
        "imagefolder-without-data-dir",
        ["experts", "--dataset", "imagefolder"],
        ["dataset 'imagefolder' needs --data-dir pointing at a folder with train/ and test/"],
    ),
    Case(
        "imagefolder-without-splits",
        ["experts", "--dataset", "imagefolder", "--data-dir", "{tmp}/empty", *TINY],
        ["{tmp}/empty is not an image folder: it needs train/<class>/<images> and test/<class>/<images>"],
        _mkdirs("empty"),
    ),
    Case(
        "imagefolder-without-images",
        ["experts", "--dataset", "imagefolder", "--data-dir", "{tmp}/f", *TINY],
        ["{tmp}/f/train holds no class folders with images"],
        _mkdirs("f/train/a", "f/test/a"),
    ),
    # --- config syntax errors name the line -------------------------------------------------------
    Case(
        "toml-syntax-error",
        ["distill", "--config", "{tmp}/c.toml"],
        ["Config file {tmp}/c.toml has a syntax error (line 2, column 8): Invalid value. Fix that line and run again."],
        _write("c.toml", "ipc = 3\nseed = = 1\n"),
    ),
    Case(
        "toml-unclosed-at-end",
        ["distill", "--config", "{tmp}/c.toml"],
        ["has a syntax error (line 3, at the end of the file)"],
        _write("c.toml", "ipc = 1\nwidth = [\n"),
    ),
    Case(
        "yaml-syntax-error",
        ["distill", "--config", "{tmp}/c.yaml"],
        ["Config file {tmp}/c.yaml has a syntax error (line 3, column 1): expected ',' or ']'"],
        _write("c.yaml", "ipc: 3\nseed: [1\n"),
    ),
    Case(
        "json-syntax-error",
        ["distill", "--config", "{tmp}/c.json"],
        [
            "Config file {tmp}/c.json is not valid JSON: Expecting property name enclosed in double quotes at line 3, column 1."
        ],
        _write("c.json", '{\n  "ipc": 3,\n}\n'),
    ),
    Case(
        "config-not-a-table",
        ["distill", "--config", "{tmp}/c.yaml"],
        ["must hold a table of settings (key = value), not list"],
        _write("c.yaml", "- 1\n- 2\n"),
    ),
    # --- experts that do not fit ----------------------------------------------------------------
    Case(
        "no-experts-default-folder",
        ["distill", *D],
        [
            "No experts found in the experts root {tmp}/experts-root (set by DPD_EXPERTS_ROOT).",
            "Train them first with `dpd experts`",
        ],
    ),
    Case(
        "no-experts-empty-folder",
        ["distill", "--experts", "{tmp}/empty", *D],
        ["No experts found in {tmp}/empty.", "`dpd experts`"],
        _mkdirs("empty"),
    ),
    Case(
        "experts-width-differs",
        ["distill", "--experts", "{experts}", "--out", "{tmp}/r", *D, "--width", "16"],
        [
            "The experts in {experts} do not fit these settings (width: experts have 8, settings give 16)",
            "train matching experts with `dpd experts`",
        ],
    ),
    Case(
        "experts-zca-differs",
        ["distill", "--experts", "{experts}", "--out", "{tmp}/r", *D, "--zca"],
        ["zca: experts have False, settings give True"],
    ),
    Case(
        "experts-too-few-epochs",
        ["distill", "--experts", "{experts}", "--out", "{tmp}/r", *D, "--max-start-epoch", "5"],
        [
            "--max-start-epoch 5 with --expert-epochs 1 needs expert epoch 5, but the experts in {experts} were trained for 3"
        ],
    ),
    Case(
        "experts-folder-other-settings",
        ["experts", "--num", "2", "--epochs", "3", "--lr", "0.05", "--out", "{tmp}/ex", *TINY],
        ["holds experts trained with other settings (lr: folder has 0.01, settings say 0.05)"],
        _copy("experts", "ex"),
    ),
    # --- a dataset with other classes than the experts / synthetic set --------------------------
    Case(
        "imagefolder-fewer-classes-than-experts",
        [
            "distill",
            "--dataset",
            "imagefolder",
            "--data-dir",
            "{tmp}/if3",
            "--experts",
            "{experts}",
            "--out",
            "{tmp}/r",
            *D,
            "--train-per-class",
            "2",
        ],
        # The dataset is checked from the experts' manifest before any image is decoded.
        ["dataset: experts have 'fashion-mnist-mini', settings give 'imagefolder-if3'"],
        _image_folder("if3", ["a", "b", "c"]),
    ),
    Case(
        "imagefolder-one-class",
        ["experts", "--dataset", "imagefolder", "--data-dir", "{tmp}/if1", "--out", "{tmp}/ex", *TINY[:4]],
        ["{tmp}/if1/train has only one class folder ('a'); classification needs at least 2."],
        _image_folder("if1", ["a"]),
    ),
    Case(
        "evaluate-dataset-with-fewer-classes",
        ["evaluate", "{tmp}/syn.safetensors", "--data-dir", "{tmp}/if3"],
        [
            "The synthetic set ((1, 28, 28) images, 10 classes) does not fit dataset imagefolder ((1, 28, 28), 3 classes). Check --data-dir."
        ],
        _both(_synthetic_as_imagefolder(), _image_folder("if3", ["a", "b", "c"])),
    ),
    Case(
        "evaluate-dataset-with-other-class-names",
        ["evaluate", "{tmp}/syn.safetensors", "--data-dir", "{tmp}/if10"],
        ["The synthetic set's classes differ from those of dataset imagefolder (label 0: 'T-shirt/top' vs 'c0'"],
        _both(_synthetic_as_imagefolder(), _image_folder("if10", TEN_OTHER)),
    ),
    Case(
        "ipc-larger-than-class",
        ["distill", "--experts", "{experts}", "--out", "{tmp}/r", *D, "--ipc", "21"],
        [
            "--ipc 21 is larger than class 'T-shirt/top' of fashion-mnist-mini, which has 20 training images. Use --ipc 20 or less."
        ],
    ),
    Case(
        "train-per-class-larger-than-class",
        ["experts", "--train-per-class", "100000", "--out", "{tmp}/ex"],
        [
            "--train-per-class 100000 is more than the smallest class of fashion-mnist-mini holds (500). Use at most 500."
        ],
    ),
    # --- files from another version of the formats ----------------------------------------------
    Case(
        "evaluate-synthetic-format-v99",
        ["evaluate", "{tmp}/v99.safetensors"],
        [
            "{tmp}/v99.safetensors is dpd.synthetic format version 99, this dpd",
            "reads version 1 or 2. Use the dpd version that wrote it",
        ],
        _synthetic_v99,
    ),
    Case(
        "resume-checkpoints-format-v99",
        ["distill", "--resume", "--experts", "{experts}", "--out", "{tmp}/run99", *D],
        ["{tmp}/run99/checkpoints/ckpt-", "is dpd.checkpoint format version 99", "Use the dpd version that wrote it"],
        _run_checkpoints_v99,
    ),
    Case(
        "experts-manifest-format-v99",
        ["distill", "--experts", "{tmp}/ex99", "--out", "{tmp}/r", *D],
        ["{tmp}/ex99/experts.json is dpd.experts format version 99; this dpd reads version 1."],
        _experts_manifest_v99,
    ),
    Case(
        "experts-trajectory-format-v99",
        ["distill", "--experts", "{tmp}/ex99", "--out", "{tmp}/r", *D],
        ["{tmp}/ex99/expert_00001.safetensors is dpd.trajectory format version 99"],
        _trajectory_v99,
    ),
    # --- other unusable inputs ------------------------------------------------------------------
    Case(
        "evaluate-a-trajectory",
        ["evaluate", "{experts}/expert_00000.safetensors"],
        [
            "{experts}/expert_00000.safetensors is not a synthetic set or checkpoint written by dpd distill (format 'dpd.trajectory')"
        ],
    ),
    Case(
        "evaluate-truncated-synthetic",
        ["evaluate", "{tmp}/cut.safetensors"],
        ["{tmp}/cut.safetensors is truncated or padded: the header describes"],
        _truncate_synthetic,
    ),
    Case(
        "existing-run-without-resume",
        ["distill", "--experts", "{experts}", "--out", "{tmp}/run", *D],
        [
            "{tmp}/run already holds a run (settings.json, preprocess.safetensors, synthetic.safetensors",
            "Continue it with --resume, start it over with --force",
        ],
        _copy("run", "run"),
    ),
    Case(
        "resume-with-other-settings",
        ["distill", "--resume", "--experts", "{experts}", "--out", "{tmp}/run", *D, "--syn-steps", "4"],
        ["{tmp}/run was started with other settings (--syn-steps: the run has 3, settings give 4). Resume"],
        _copy("run", "run"),
    ),
    Case(
        "resume-nothing",
        ["distill", "--resume", "--experts", "{experts}", "--out", "{tmp}/fresh", *D],
        ["Nothing to resume in {tmp}/fresh: it has no checkpoint. Run without --resume to start it."],
    ),
    # --- GPU asked for but absent ----------------------------------------------------------------
    Case(
        "experts-cuda-absent",
        ["experts", "--device", "cuda", *TINY],
        ["--device cuda was asked for, but no CUDA GPU is available", "Use --device cpu or --device auto."],
    ),
    Case(
        "distill-cuda1-absent",
        ["distill", "--device", "cuda:1", "--experts", "{experts}", "--out", "{tmp}/r", *D],
        ["--device cuda:1 was asked for, but no CUDA GPU is available"],
    ),
    Case(
        "evaluate-cuda-absent",
        ["evaluate", "{run}", "--device", "cuda"],
        ["--device cuda was asked for, but no CUDA GPU is available"],
    ),
    # --- inspect -----------------------------------------------------------------------------------
    Case("inspect-missing", ["inspect", "{tmp}/nowhere"], ["{tmp}/nowhere does not exist."]),
    # The sentence on what `dpd inspect` reads comes once, and ends the message.
    Case(
        "inspect-json-file",
        ["inspect", "{tmp}/cfg.json"],
        [
            "{tmp}/cfg.json is a JSON file (plain text: open it directly); `dpd inspect` reads run directories, experts folders, "
            "export folders and safetensors files.\n"
        ],
        _write("cfg.json", "{}"),
    ),
    Case(
        "inspect-not-safetensors",
        ["inspect", "{tmp}/c.toml"],
        ["{tmp}/c.toml is not a valid safetensors file"],
        _write("c.toml", "ipc = 1\n"),
    ),
]

_NEEDS_NO_GPU = {"experts-cuda-absent", "distill-cuda1-absent", "evaluate-cuda-absent"}
# Bad flags, env or config files: the message is the whole story, so no "DPD_DEBUG=1" hint follows it.
_NO_TRACEBACK = {
    "unknown-config-key",
    "unknown-config-table",
    "ipc-zero",
    "prune-ratio-one",
    "prune-ratio-negative",
    "experts-negative-epochs",
    "evaluate-negative-epochs",
    "fail-under-above-100",
    "prune-warmup-covers-all",
    "resume-and-force",
    "config-key-wrong-type",
    "config-key-list-for-int",
    "env-wrong-type",
    "unknown-device",
    "unknown-dataset",
    "unknown-model",
    "unknown-evaluate-model",
    "data-dir-empty",
    "out-empty",
    "experts-path-empty",
    "config-path-empty",
    "config-missing",
    "config-is-a-folder",
    "imagefolder-without-data-dir",
    "toml-syntax-error",
    "toml-unclosed-at-end",
    "yaml-syntax-error",
    "json-syntax-error",
    "config-not-a-table",
    "fail-under-fraction",
    "unknown-protocol",
    "shared-env-of-colliding-setting",
    "env-unknown-variable",
    "config-from-env-missing",
    "prune-ema-beta-without-ema",
    "prune-ema-beta-one",
    "prune-criterion-typo",
    "prune-direction-typo",
    "prune-mode-typo",
    "prune-mask-typo",
    "keep-checkpoints-zero",
    "keep-checkpoints-word",
    "keep-graphs-with-full-memory",
    "keep-graphs-above-steps",
}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, shared, tmp_path):
    if case.id in _NEEDS_NO_GPU and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if case.setup is not None:
        case.setup(tmp_path, shared)
    subst = {"tmp": str(tmp_path), "experts": str(shared["experts"]), "run": str(shared["run"])}
    argv = [a.format(**subst) for a in case.argv]
    env = {k: v.format(**subst) for k, v in (case.env or {}).items()}
    result = CliRunner().invoke(app, argv, env=env)
    out = result.output
    assert result.exit_code == 2, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out
    for text in case.expected:
        assert text.format(**subst) in out, out
    if not out.startswith("Usage:"):
        # One paragraph on stderr, then the DPD_DEBUG hint where a traceback has more to say; nothing on stdout.
        lines = result.stderr.splitlines()
        hint = [] if case.id in _NO_TRACEBACK else ["(Set DPD_DEBUG=1 to see the traceback.)"]
        assert lines[0].startswith("Error: ") and lines[1:] == hint, result.stderr
        assert result.stdout == ""


def test_debug_shows_the_traceback_and_keeps_the_exit_code():
    result = CliRunner().invoke(app, ["distill", "--ipc", "0", "--print-config"], env={"DPD_DEBUG": "1"})
    assert result.exit_code == 2, result.output
    assert "Traceback (most recent call last)" in result.stderr and "SettingsError" in result.stderr
    assert "Error: Invalid settings for `dpd distill`: --ipc:" in result.stderr
    assert "Set DPD_DEBUG=1" not in result.stderr and result.stdout == ""
