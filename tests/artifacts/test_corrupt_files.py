"""Corrupted and hostile files against every loader: always a ``UserError`` with a clear message.

The loaders are ``storage.load_tensors``, ``storage.TensorFile``, ``engine.distill.load_synthetic``
and ``artifacts.experts.ExpertSet`` (which opens a folder: the broken file is put in as an
expert). Byte-level damage must be refused by all four; files that are valid safetensors but
carry the wrong tensors, shapes, dtypes or metadata must be refused by the loader that knows
what it needs. A seeded byte-mutation loop checks that nothing else ever escapes, and that
whatever loads is as validated. No loader may unpickle anything.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

import dpd_cli
from dpd_cli.artifacts.experts import MANIFEST, PREPROCESS, ExpertSet
from dpd_cli.artifacts.synthetic import load as load_synthetic
from dpd_cli.errors import StorageError, UserError
from dpd_cli.io import storage
from dpd_cli.models import FlatModel, build_model
from tests.helpers import tiny_spec

SPEC = tiny_spec(channels=1, side=8, n_classes=3, width=2, depth=1)
EPOCHS = 2
N_PARAMS = FlatModel(build_model(SPEC)).n_params
LAYOUT = FlatModel(build_model(SPEC)).layout
SYN_REQUIRED = {"images": (torch.float32, 4), "labels": (torch.int64, 1), "lr": (torch.float32, 0)}


# ----------------------------------------------------------------------------------------------
# Valid files, built directly (no training): a synthetic set and an experts folder.


def _meta_bytes(fmt: str, meta: dict) -> dict[str, str]:
    return storage._encode_meta(fmt, meta)


def synthetic_tensors() -> dict[str, torch.Tensor]:
    return {
        "images": torch.randn(3, 1, 8, 8),
        "labels": torch.arange(3),
        "lr": torch.tensor(0.01),
        "norm_mean": torch.tensor([0.5]),
        "norm_std": torch.tensor([0.25]),
    }


def synthetic_meta() -> dict:
    return {
        "dataset": "fashion-mnist-mini",
        "classes": ["a", "b", "c"],
        "model": SPEC.to_dict(),
        "iteration": 4,
        "iterations": 4,
        "ipc": 1,
        "settings": {"seed": 0},
    }


def synthetic_blob(tensors=None, meta=None, fmt="dpd.synthetic", raw_meta: dict[str, str] | None = None) -> bytes:
    m = raw_meta if raw_meta is not None else _meta_bytes(fmt, synthetic_meta() if meta is None else meta)
    return st_save(synthetic_tensors() if tensors is None else tensors, metadata=m)


def trajectory_meta() -> dict:
    return {"model": SPEC.to_dict(), "layout": LAYOUT, "epochs": EPOCHS, "index": 0}


def trajectory_blob(trajectory=None, meta=None, raw_meta=None) -> bytes:
    t = torch.randn(EPOCHS + 1, N_PARAMS) if trajectory is None else trajectory
    m = raw_meta if raw_meta is not None else _meta_bytes("dpd.trajectory", trajectory_meta() if meta is None else meta)
    return st_save({"trajectory": t} if isinstance(t, torch.Tensor) else t, metadata=m)


@pytest.fixture
def experts_folder(tmp_path) -> Path:
    """A valid experts folder with two experts; tests replace expert_00000 with a broken file."""
    folder = tmp_path / "experts"
    folder.mkdir()
    (folder / MANIFEST).write_text(
        json.dumps({"format": "dpd.experts", "format_version": 1, "compat": {"dataset": "x", "zca": False}})
    )
    storage.save_tensors(
        folder / PREPROCESS, {"norm_mean": torch.tensor([0.5]), "norm_std": torch.tensor([0.25])}, "dpd.preprocess"
    )
    for i in range(2):
        (folder / f"expert_{i:05d}.safetensors").write_bytes(trajectory_blob())
    ExpertSet(folder)  # valid as built
    return folder


# ----------------------------------------------------------------------------------------------
# The loaders, each given the bytes of a (possibly broken) file of the kind it reads.


def _file(tmp: Path, blob: bytes, name="f.safetensors") -> Path:
    p = tmp / name
    p.write_bytes(blob)
    return p


def load_with_load_tensors(tmp, blob, kind, experts_folder):
    fmt, required = (
        ("dpd.synthetic", SYN_REQUIRED)
        if kind == "synthetic"
        else ("dpd.trajectory", {"trajectory": (torch.float32, 2)})
    )
    path = _file(tmp, blob)
    return path, lambda: storage.load_tensors(path, fmt, required)


def load_with_tensor_file(tmp, blob, kind, experts_folder):
    path = _file(tmp, blob)

    def load():
        with storage.TensorFile(path, "dpd.synthetic" if kind == "synthetic" else "dpd.trajectory") as f:
            name = "images" if kind == "synthetic" else "trajectory"
            if name not in f.header:
                raise StorageError(f"{path} lacks {name}")  # what a caller does with the header
            return f.rows(name, [0])

    return path, load


def load_with_load_synthetic(tmp, blob, kind, experts_folder):
    path = _file(tmp, blob)
    return path, lambda: load_synthetic(path)


def load_with_expert_set(tmp, blob, kind, experts_folder):
    path = experts_folder / "expert_00000.safetensors"
    path.write_bytes(blob)

    def load():
        es = ExpertSet(experts_folder)
        return [es.pair(i, 0, EPOCHS) for i in range(len(es))]

    return path, load


LOADERS: dict[str, Callable] = {
    "load_tensors": load_with_load_tensors,
    "TensorFile": load_with_tensor_file,
    "load_synthetic": load_with_load_synthetic,
    "ExpertSet": load_with_expert_set,
}
#: Which valid file each loader starts from.
KIND = {
    "load_tensors": "synthetic",
    "TensorFile": "synthetic",
    "load_synthetic": "synthetic",
    "ExpertSet": "trajectory",
}


def _valid(kind: str) -> bytes:
    return synthetic_blob() if kind == "synthetic" else trajectory_blob()


def assert_refused(load: Callable, path: Path) -> str:
    """The loader raises a UserError (never anything else) whose one-line message names the file."""
    with pytest.raises(UserError) as info:
        load()
    msg = str(info.value)
    assert path.name in msg, msg
    assert "\n" not in msg and len(msg) < 2000, msg
    return msg


# ----------------------------------------------------------------------------------------------
# Byte-level damage: every loader refuses it.


def _with_header_length(blob: bytes, n: int) -> bytes:
    return struct.pack("<Q", n) + blob[8:]


def _header_and_body(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _rebuild(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _edit_header(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def damage(blob: bytes) -> bytes:
        header, body = _header_and_body(blob)
        edit(header)
        return _rebuild(header, body)

    return damage


def _set_meta(**raw: str) -> Callable[[bytes], bytes]:
    return _edit_header(lambda h: h["__metadata__"].update(raw))


def _first_tensor(h: dict) -> dict:
    return next(v for k, v in h.items() if k != "__metadata__")


def _nested_header(blob: bytes) -> bytes:
    deep = ("[" * 200_000 + "]" * 200_000).encode()
    return struct.pack("<Q", len(deep)) + deep


def _torch_pickle(blob: bytes) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"images": torch.zeros(2)}, buf)  # a PyTorch pickle/zip file: must never be unpickled
    return buf.getvalue()


BYTE_DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "zero-length": lambda b: b"",
    "truncated-4-bytes": lambda b: b[:4],
    "truncated-after-length": lambda b: b[:8],
    "truncated-mid-header": lambda b: b[: 8 + struct.unpack("<Q", b[:8])[0] // 2],
    "truncated-after-header": lambda b: b[: 8 + struct.unpack("<Q", b[:8])[0]],
    "truncated-mid-data": lambda b: b[: (8 + struct.unpack("<Q", b[:8])[0] + len(b)) // 2],
    "truncated-last-byte": lambda b: b[:-1],
    "padded": lambda b: b + b"\0" * 8,
    "random-bytes-16": lambda b: random.Random(1).randbytes(16),
    "random-bytes-4k": lambda b: random.Random(2).randbytes(4096),
    "random-body-keeps-length": lambda b: b[:8] + random.Random(3).randbytes(len(b) - 8),
    "png-file": lambda b: b"\x89PNG\r\n\x1a\n" + b"\0" * 100,
    "json-text": lambda b: b'{"images": [1, 2, 3]}',
    "torch-pickle": _torch_pickle,
    "header-length-zero": lambda b: _with_header_length(b, 0),
    "header-length-2**63": lambda b: _with_header_length(b, 2**63),
    "header-not-utf8": lambda b: b[:8] + b"\xff\xfe" + b[10:],
    "header-not-json": lambda b: b[:8] + b"not json" + b[16:],
    "header-a-list": lambda b: _rebuild([1, 2], b""),  # type: ignore[arg-type]
    "header-nested-too-deep": _nested_header,
    "tensor-entry-not-a-table": _edit_header(lambda h: h.update(x=[0, 4])),
    "dtype-unknown": _edit_header(lambda h: _first_tensor(h).update(dtype="X99")),
    "shape-negative": _edit_header(lambda h: _first_tensor(h).update(shape=[-1])),
    "shape-disagrees-with-offsets": _edit_header(lambda h: _first_tensor(h).update(shape=[1000])),
    "offsets-overlap": _edit_header(lambda h: h.update(alias=dict(_first_tensor(h)))),  # two tensors on the same bytes
    "offsets-reversed": _edit_header(
        lambda h: _first_tensor(h).update(data_offsets=list(reversed(_first_tensor(h)["data_offsets"])))
    ),
    "metadata-a-list": _edit_header(lambda h: h.update(__metadata__=["a"])),
    "metadata-value-not-text": _edit_header(lambda h: h["__metadata__"].update(model={"name": "convnet"})),
    "metadata-value-not-json": _set_meta(model="{not json"),
    "metadata-value-nested-too-deep": _set_meta(model="[" * 100_000 + "]" * 100_000),
    "no-metadata": _edit_header(lambda h: h.pop("__metadata__")),
    "format-missing": _edit_header(lambda h: h["__metadata__"].pop("format")),
    "format-foreign": _set_meta(format="someone.else"),
    "format-version-99": _set_meta(format_version="99"),
    "format-version-missing": _edit_header(lambda h: h["__metadata__"].pop("format_version")),
}


@pytest.mark.parametrize("damage", list(BYTE_DAMAGE), ids=list(BYTE_DAMAGE))
@pytest.mark.parametrize("loader", list(LOADERS))
def test_byte_damage_refused_by_every_loader(loader, damage, tmp_path, experts_folder):
    blob = BYTE_DAMAGE[damage](_valid(KIND[loader]))
    path, load = LOADERS[loader](tmp_path, blob, KIND[loader], experts_folder)
    assert_refused(load, path)


def test_header_over_64_mb_refused_before_parsing(tmp_path, experts_folder):
    """A 70 MB header (a sparse file: nothing big is kept in the repo or written) is refused by its length alone."""
    n = 70 * 1024 * 1024
    for loader in LOADERS:
        path, load = LOADERS[loader](tmp_path, b"", KIND[loader], experts_folder)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", n) + b'{"__metadata__": {"x": "')
            f.truncate(8 + n)
        msg = assert_refused(load, path)
        assert f"(header length {n} does not fit a {8 + n}-byte file)" in msg, msg


# ----------------------------------------------------------------------------------------------
# Valid safetensors, wrong content: refused by the loader that knows what it needs.


def _syn(tensors_edit=None, meta_edit=None, fmt="dpd.synthetic") -> bytes:
    t, m = synthetic_tensors(), synthetic_meta()
    if tensors_edit:
        tensors_edit(t)
    if meta_edit:
        meta_edit(m)
    return synthetic_blob(t, m, fmt)


SYNTHETIC_CASES: dict[str, tuple[bytes, str]] = {
    # name: (file, expected text)
    "no-images": (_syn(lambda t: t.pop("images")), "lacks the tensor 'images'"),
    "images-float64": (_syn(lambda t: t.update(images=t["images"].double())), "tensor 'images' is torch.float64"),
    "images-3d": (_syn(lambda t: t.update(images=t["images"][:, 0])), "expected torch.float32 with 4 dimensions"),
    "images-wrong-size": (
        _syn(lambda t: t.update(images=torch.randn(3, 1, 9, 9))),
        "but the model takes (1, 8, 8) images",
    ),
    "images-nan": (_syn(lambda t: t["images"].fill_(float("nan"))), "non-finite images"),
    "images-empty": (
        _syn(lambda t: t.update(images=torch.zeros(0, 1, 8, 8), labels=torch.zeros(0, dtype=torch.long))),
        "images have shape (0, 1, 8, 8)",
    ),
    "labels-int32": (_syn(lambda t: t.update(labels=t["labels"].int())), "tensor 'labels' is torch.int32"),
    "labels-out-of-range": (
        _syn(lambda t: t.update(labels=torch.tensor([0, 1, 7]))),
        "labels must lie in 0..2, found 0..7",
    ),
    "labels-negative": (_syn(lambda t: t.update(labels=torch.tensor([-1, 0, 1]))), "labels must lie in 0..2"),
    "labels-count": (_syn(lambda t: t.update(labels=torch.arange(2))), "3 images but 2 labels"),
    "lr-negative": (_syn(lambda t: t.update(lr=torch.tensor(-1.0))), "non-positive learning rate"),
    "lr-inf": (
        _syn(lambda t: t.update(lr=torch.tensor(float("inf")))),
        "non-finite images or a non-positive learning rate",
    ),
    "lr-vector": (_syn(lambda t: t.update(lr=torch.tensor([0.01]))), "tensor 'lr' is torch.float32 with shape (1,)"),
    "norm-std-zero": (_syn(lambda t: t.update(norm_std=torch.tensor([0.0]))), "normalisation std must be positive"),
    "norm-wrong-channels": (
        _syn(lambda t: t.update(norm_mean=torch.zeros(3))),
        "tensor 'norm_mean' is torch.float32 (3,), expected finite float32 (1,)",
    ),
    "zca-partial": (_syn(lambda t: t.update(zca_matrix=torch.eye(64))), "only part of the ZCA transform"),
    "zca-wrong-shape": (
        _syn(lambda t: t.update(zca_mean=torch.zeros(64), zca_matrix=torch.eye(3), zca_inverse=torch.eye(64))),
        "tensor 'zca_matrix'",
    ),
    "no-model-metadata": (_syn(meta_edit=lambda m: m.pop("model")), "lacks the metadata entry 'model'"),
    "model-a-string": (
        _syn(meta_edit=lambda m: m.update(model="convnet")),
        "the metadata entry 'model' is missing or malformed",
    ),
    "model-unknown-name": (
        _syn(meta_edit=lambda m: m["model"].update(name="gpt")),
        "the metadata entry 'model' is missing or malformed",
    ),
    "model-negative-channels": (
        _syn(meta_edit=lambda m: m["model"].update(channels=-1)),
        "the metadata entry 'model' is missing or malformed",
    ),
    "model-extra-key": (
        _syn(meta_edit=lambda m: m["model"].update(evil=1)),
        "the metadata entry 'model' is missing or malformed",
    ),
    "classes-too-few": (
        _syn(meta_edit=lambda m: m.update(classes=["a"])),
        "the metadata entry 'classes' is not a list of 3 class names",
    ),
    "classes-not-text": (_syn(meta_edit=lambda m: m.update(classes=[1, 2, 3])), "the metadata entry 'classes'"),
    "dataset-not-text": (
        _syn(meta_edit=lambda m: m.update(dataset=5)),
        "the metadata entry 'dataset' is not a dataset name",
    ),
    "settings-a-list": (_syn(meta_edit=lambda m: m.update(settings=[1])), "the metadata entry 'settings' is malformed"),
    "ipc-text": (_syn(meta_edit=lambda m: m.update(ipc="ten")), "the metadata entry 'ipc' is malformed"),
    "iteration-bool": (
        _syn(meta_edit=lambda m: m.update(iteration=True)),
        "the metadata entry 'iteration' is malformed",
    ),
    "checkpoint-without-momentum": (_syn(fmt="dpd.checkpoint"), "lacks the tensor 'momentum_images'"),
    "checkpoint-bad-momentum-shape": (
        _syn(
            lambda t: t.update(
                momentum_images=torch.zeros(3, 1, 4, 4),
                momentum_lr=torch.tensor(0.0),
                prune_counts=torch.zeros(N_PARAMS, dtype=torch.int32),
            ),
            fmt="dpd.checkpoint",
        ),
        "tensor 'momentum_images' is torch.float32 (3, 1, 4, 4)",
    ),
    "checkpoint-negative-iteration": (
        _syn(
            lambda t: t.update(
                momentum_images=torch.zeros(3, 1, 8, 8),
                momentum_lr=torch.tensor(0.0),
                prune_counts=torch.zeros(N_PARAMS, dtype=torch.int32),
            ),
            lambda m: m.update(iteration=-1),
            fmt="dpd.checkpoint",
        ),
        "a checkpoint needs a non-negative 'iteration'",
    ),
    "a-trajectory": (
        trajectory_blob(),
        "is not a synthetic set or checkpoint written by dpd distill (format 'dpd.trajectory')",
    ),
    "plain-safetensors": (
        st_save(synthetic_tensors()),
        "is not a synthetic set or checkpoint written by dpd distill (format None)",
    ),
}


@pytest.mark.parametrize("case", list(SYNTHETIC_CASES), ids=list(SYNTHETIC_CASES))
def test_wrong_content_refused_by_load_synthetic(case, tmp_path):
    blob, expected = SYNTHETIC_CASES[case]
    path = _file(tmp_path, blob)
    assert expected in assert_refused(lambda: load_synthetic(path), path)


def _traj(trajectory=None, meta_edit=None) -> bytes:
    m = trajectory_meta()
    if meta_edit:
        meta_edit(m)
    return trajectory_blob(trajectory, m)


TRAJECTORY_CASES: dict[str, tuple[bytes, str]] = {
    "no-trajectory": (
        trajectory_blob({"weights": torch.zeros(EPOCHS + 1, N_PARAMS)}),
        "trajectory tensor is None None, expected F32",
    ),
    "float64": (_traj(torch.zeros(EPOCHS + 1, N_PARAMS, dtype=torch.float64)), "trajectory tensor is F64"),
    "float16": (_traj(torch.zeros(EPOCHS + 1, N_PARAMS, dtype=torch.float16)), "trajectory tensor is F16"),
    "missing-epoch-row": (
        _traj(torch.zeros(EPOCHS, N_PARAMS)),
        f"trajectory tensor is F32 ({EPOCHS}, {N_PARAMS}), expected F32 ({EPOCHS + 1}, {N_PARAMS})",
    ),
    "wrong-parameter-count": (_traj(torch.zeros(EPOCHS + 1, N_PARAMS + 1)), "expected F32"),
    "1d": (_traj(torch.zeros(N_PARAMS)), "expected F32"),
    "model-missing": (_traj(meta_edit=lambda m: m.pop("model")), "the metadata entry 'model' is missing or malformed"),
    "model-bad-image-size": (
        _traj(meta_edit=lambda m: m["model"].update(image_size=[8])),
        "the metadata entry 'model' is missing or malformed",
    ),
    "layout-missing": (
        _traj(meta_edit=lambda m: m.pop("layout")),
        "the metadata entry 'layout' is missing or malformed",
    ),
    "layout-garbage": (
        _traj(meta_edit=lambda m: m.update(layout=[["w", ["x"]]])),
        "the metadata entry 'layout' is missing or malformed",
    ),
    "layout-huge-dim": (
        _traj(meta_edit=lambda m: m.update(layout=[["w", [2**40]]])),
        "the metadata entry 'layout' is missing or malformed",
    ),
    "epochs-text": (
        _traj(meta_edit=lambda m: m.update(epochs="2")),
        "the metadata entry 'epochs' is missing or malformed",
    ),
    "epochs-zero": (
        _traj(meta_edit=lambda m: m.update(epochs=0)),
        "the metadata entry 'epochs' is missing or malformed",
    ),
    "a-synthetic-set": (synthetic_blob(), "is a 'dpd.synthetic' file; expected a 'dpd.trajectory' file"),
}


@pytest.mark.parametrize("case", list(TRAJECTORY_CASES), ids=list(TRAJECTORY_CASES))
def test_wrong_content_refused_by_expert_set(case, tmp_path, experts_folder):
    blob, expected = TRAJECTORY_CASES[case]
    path, load = load_with_expert_set(tmp_path, blob, "trajectory", experts_folder)
    assert expected in assert_refused(load, path)


def test_second_expert_with_another_model_refused(tmp_path, experts_folder):
    other = tiny_spec(channels=1, side=8, n_classes=3, width=3, depth=1)
    fm = FlatModel(build_model(other))
    blob = trajectory_blob(
        torch.zeros(EPOCHS + 1, fm.n_params), {"model": other.to_dict(), "layout": fm.layout, "epochs": EPOCHS}
    )
    path = experts_folder / "expert_00001.safetensors"
    path.write_bytes(blob)
    assert "expected F32" in assert_refused(lambda: ExpertSet(experts_folder), path)


def test_nan_trajectory_refused_by_pair(tmp_path, experts_folder):
    t = torch.randn(EPOCHS + 1, N_PARAMS)
    t[EPOCHS, 5] = float("nan")
    path = experts_folder / "expert_00001.safetensors"
    path.write_bytes(trajectory_blob(t))
    es = ExpertSet(experts_folder)  # the header is fine; rows are checked when read
    es.pair(1, 0, 1)  # rows 0 and 1 are finite
    msg = assert_refused(lambda: es.pair(1, 0, EPOCHS), path)
    assert f"holds NaN or Inf parameters at epoch 0 or {EPOCHS}. Delete it and rerun `dpd experts`." in msg


@pytest.mark.parametrize("case", ["missing", "not-json", "a-list", "compat-a-list", "version-99", "foreign-format"])
def test_broken_manifest_refused(case, experts_folder):
    m = experts_folder / MANIFEST
    good = json.loads(m.read_text())
    if case == "missing":
        m.unlink()
    elif case == "not-json":
        m.write_text("{")
    elif case == "a-list":
        m.write_text("[]")
    elif case == "compat-a-list":
        m.write_text(json.dumps({**good, "compat": []}))
    elif case == "version-99":
        m.write_text(json.dumps({**good, "format_version": 99}))
    else:
        m.write_text(json.dumps({**good, "format": "other"}))
    assert_refused(lambda: ExpertSet(experts_folder), m)


@pytest.mark.parametrize("case", ["missing", "no-std", "wrong-channels", "zero-std", "swapped"])
def test_broken_preprocess_refused(case, experts_folder):
    p = experts_folder / PREPROCESS
    if case == "missing":
        p.unlink()
    elif case == "no-std":
        storage.save_tensors(p, {"norm_mean": torch.tensor([0.5])}, "dpd.preprocess")
    elif case == "wrong-channels":
        storage.save_tensors(p, {"norm_mean": torch.zeros(3), "norm_std": torch.ones(3)}, "dpd.preprocess")
    elif case == "zero-std":
        storage.save_tensors(p, {"norm_mean": torch.tensor([0.5]), "norm_std": torch.tensor([0.0])}, "dpd.preprocess")
    else:  # valid, but not the normalisation the experts recorded
        for f in experts_folder.glob("expert_*.safetensors"):
            f.write_bytes(trajectory_blob(meta={**trajectory_meta(), "preprocess_fingerprint": "0123456789abcdef"}))
    assert_refused(lambda: ExpertSet(experts_folder), p)


# ----------------------------------------------------------------------------------------------
# Fuzz: seeded byte mutations of small valid files.

FUZZ_ITERATIONS = 200


def _mutate(blob: bytes, rng: random.Random) -> bytes:
    b = bytearray(blob)
    (n,) = struct.unpack("<Q", blob[:8])
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["flip", "flip-header", "byte", "truncate", "insert", "delete", "length"])
        if not b:
            break
        if op == "flip":
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == "flip-header":
            i = rng.randrange(min(len(b), 8 + n))
            b[i] ^= 1 << rng.randrange(8)
        elif op == "byte":
            b[rng.randrange(len(b))] = rng.choice(b'{}[]",:0123456789-e.\x00\xff ')
        elif op == "truncate":
            del b[rng.randrange(len(b)) :]
        elif op == "insert":
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == "delete":
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 16)]
        else:
            b[:8] = struct.pack("<Q", max(0, n + rng.randint(-16, 16)))
    return bytes(b)


def test_fuzz_loaders_only_refuse_or_validate(tmp_path, experts_folder, monkeypatch):
    """Every mutation either loads as validated or raises a UserError: never another exception, never pickle."""

    def no_pickle(*a, **k):
        raise AssertionError("a loader tried to unpickle")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, no_pickle)
    rng = random.Random(20240607)
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(FUZZ_ITERATIONS):
        kind = "synthetic" if i % 2 == 0 else "trajectory"
        blob = _mutate(_valid(kind), rng)
        loaders = (
            ["load_tensors", "TensorFile", "load_synthetic"]
            if kind == "synthetic"
            else ["load_tensors", "TensorFile", "ExpertSet"]
        )
        for loader in loaders:
            path, load = LOADERS[loader](tmp_path, blob, kind, experts_folder)
            try:
                result = load()
            except UserError as e:
                assert str(e) and "\n" not in str(e), (i, loader, str(e))
                outcomes["refused"] += 1
                continue
            except Exception as e:  # pragma: no cover - this is the failure being tested for
                pytest.fail(f"mutation {i} ({kind}) made {loader} raise {type(e).__name__}: {e}")
            outcomes["loaded"] += 1
            if loader == "load_synthetic":
                t, meta = result
                assert torch.isfinite(t["images"]).all() and t["lr"] > 0
                assert int(t["labels"].min()) >= 0 and int(t["labels"].max()) < len(meta["classes"])
                assert tuple(t["images"].shape[1:]) == (meta["model"]["channels"], *meta["model"]["image_size"])
            elif loader == "ExpertSet":
                assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in result)
        if kind == "trajectory":  # ExpertSet's folder must not keep a broken expert for the next synthetic round
            (experts_folder / "expert_00000.safetensors").write_bytes(trajectory_blob())
    # The mutations exercise both outcomes.
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 20, outcomes


# ----------------------------------------------------------------------------------------------
# No pickle anywhere in the package.


def test_package_never_unpickles():
    """No torch.load / pickle / numpy allow_pickle in dpd's own code (torchvision's md5-checked CIFAR reader aside).

    The one exception: MTT's replay buffers are pickles, read by artifacts/replay_buffer.py with
    ``torch.load(..., weights_only=True)``, which builds tensors and containers only (export READMEs
    tell users to load with it too).
    """
    banned = re.compile(
        r"\btorch\.load\b|\bimport pickle\b|\bpickle\.|\bdill\b|\bjoblib\b|allow_pickle\s*=\s*True|\bcloudpickle\b|torch\.jit\.load"
    )
    root = Path(dpd_cli.__file__).parent
    offenders, weights_only = [], []
    for f in sorted(root.rglob("*.py")):
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\btorch\.load\(.*weights_only=True", code) and not re.search(
                r"weights_only=False|pickle_module", code
            ):
                weights_only.append(f"{f.relative_to(root)}:{n}")
            elif banned.search(code):
                offenders.append(f"{f.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, offenders
    assert "artifacts/replay_buffer.py" in {w.split(":")[0] for w in weights_only}


def test_corrupt_synthetic_in_a_run_dir_keeps_message_actionable(tmp_path):
    """A run dir's broken synthetic.safetensors names the fix (--resume rewrites it from a checkpoint)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "synthetic.safetensors").write_bytes(synthetic_blob()[:-10])
    msg = assert_refused(lambda: load_synthetic(run / "synthetic.safetensors"), run / "synthetic.safetensors")
    assert "Rerun `dpd distill` with --resume" in msg


# ----------------------------------------------------------------------------------------------
# Content checksums: the digest of the tensor data recorded in the metadata.


def _written(tmp: Path, kind: str) -> bytes:
    """The bytes of a valid file of ``kind`` as dpd writes it (with its data digest)."""
    p = tmp / f"written-{kind}.safetensors"
    if kind == "synthetic":
        storage.save_tensors(p, synthetic_tensors(), "dpd.synthetic", synthetic_meta())
    else:
        storage.save_tensors(p, {"trajectory": torch.randn(EPOCHS + 1, N_PARAMS)}, "dpd.trajectory", trajectory_meta())
    return p.read_bytes()


def _data_start(blob: bytes) -> int:
    return 8 + struct.unpack("<Q", blob[:8])[0]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("loader", list(LOADERS))
def test_flipped_data_byte_refused_by_every_loader(loader, where, tmp_path, experts_folder):
    """One byte inverted inside the tensor data, header intact: each loader refuses it, naming the file and why."""
    blob = bytearray(_written(tmp_path, KIND[loader]))
    start = _data_start(bytes(blob))
    pos = {"first": start, "middle": (start + len(blob)) // 2, "last": len(blob) - 1}[where]
    blob[pos] ^= 0x01
    path, load = LOADERS[loader](tmp_path, bytes(blob), KIND[loader], experts_folder)
    msg = assert_refused(load, path)
    assert "does not match the checksum recorded when it was written" in msg
    assert "Recreate it" in msg or "Delete it" in msg


@pytest.mark.parametrize("loader", list(LOADERS))
def test_file_without_digest_still_loads(loader, tmp_path, experts_folder):
    """Files written before dpd recorded checksums (safetensors' own writer here, as 0.2's fixtures) read as before."""
    blob = _valid(KIND[loader])
    assert storage.DIGEST_KEY not in storage._encode_meta("dpd.synthetic", {})
    path, load = LOADERS[loader](tmp_path, blob, KIND[loader], experts_folder)
    load()
    assert storage.verify_data(path) is False  # unverified, not refused


def test_streamed_digest_equals_hashlib_over_the_data(tmp_path, monkeypatch):
    """The streamed check agrees with BLAKE2b-128 of the raw bytes after the 8 + N header bytes, across chunks."""
    monkeypatch.setattr(storage, "_VERIFY_CHUNK", 1000)  # many chunks, the last one partial
    p = tmp_path / "t.safetensors"
    storage.save_tensors(p, {"a": torch.randn(1234), "b": torch.arange(77, dtype=torch.int16)}, "dpd.prune_counts")
    blob = p.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    expected = hashlib.blake2b(blob[8 + n :], digest_size=16).hexdigest()
    assert storage.data_digest(p) == expected
    assert storage.read_meta(p)[1][storage.DIGEST_KEY] == expected
    assert storage.verify_data(p) is True


def test_tensor_file_verifies_once_per_process(tmp_path, monkeypatch):
    """The whole data is read once when a file is first opened; later opens and row reads do not read it again."""
    p = tmp_path / "expert.safetensors"
    storage.save_tensors(p, {"trajectory": torch.randn(EPOCHS + 1, N_PARAMS)}, "dpd.trajectory", trajectory_meta())
    calls = []
    real = storage._digest_from
    monkeypatch.setattr(storage, "_digest_from", lambda f: calls.append(1) or real(f))
    for _ in range(3):
        with storage.TensorFile(p, "dpd.trajectory") as f:
            assert f.verified
            f.rows("trajectory", [0, 1])
    assert len(calls) == 1
    # A rewritten file (another inode or modification time) is verified again.
    storage.save_tensors(p, {"trajectory": torch.randn(EPOCHS + 1, N_PARAMS)}, "dpd.trajectory", trajectory_meta())
    storage.TensorFile(p, "dpd.trajectory").close()
    assert len(calls) == 2


def test_malformed_digest_entry_refused(tmp_path):
    raw = {**_meta_bytes("dpd.synthetic", synthetic_meta()), storage.DIGEST_KEY: json.dumps("not-a-digest")}
    p = _file(tmp_path, synthetic_blob(raw_meta=raw))
    msg = assert_refused(lambda: load_synthetic(p), p)
    assert storage.DIGEST_KEY in msg
