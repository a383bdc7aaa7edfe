"""``dpd experts import``: MTT replay buffers become experts that compute what MTT's networks computed.

The buffers are written here as MTT's buffer.py writes them, from a ConvNet built as MTT's
networks.py builds it (``tests.helpers.mtt_convnet``), never from dpd's own network or flattening.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from dpd_cli import interrupt
from dpd_cli.artifacts import replay_buffer
from dpd_cli.artifacts.experts import ExpertSet, expert_path
from dpd_cli.config.settings import ExpertSettings, ImportSettings
from dpd_cli.errors import ExpertsError, SettingsError, StorageError, UserError
from dpd_cli.events import ImportExpert
from dpd_cli.io import storage
from dpd_cli.models import FlatModel, build_model
from dpd_cli.recipes import experts as experts_engine
from dpd_cli.recipes import experts_import
from tests.helpers import StopWhen, assert_close, make_image_folder, mtt_buffer, mtt_convnet

FMNIST = {"dataset": "fashion-mnist-mini", "zca": False, "width": 4, "depth": 2}


def _settings(out: Path, **kw) -> ImportSettings:
    return ImportSettings(**{**FMNIST, "threads": 1, "out": out, **kw})


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _fmnist_nets(n: int, seed: int = 0, **kw) -> list:
    torch.manual_seed(seed)
    return [mtt_convnet(1, 10, 4, 2, (28, 28), **kw) for _ in range(n)]


# --- what an imported expert is ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("norm", "pool"), [("instancenorm", "avgpooling"), ("batchnorm", "maxpooling"), ("none", "avgpooling")]
)
def test_imported_experts_compute_what_mtts_network_computed(tmp_path, norm, pool):
    nets = _fmnist_nets(2, norm=norm, pooling=pool)
    buffer = mtt_buffer(nets, n_snapshots=3)
    src = _save(tmp_path / "replay_buffer_0.pt", buffer)
    dpd_norm, dpd_pool = {"instancenorm": "instance", "batchnorm": "batch", "none": "none"}[norm], pool[:3]
    experts_import.run(_settings(tmp_path / "imp", norm=dpd_norm, pool=dpd_pool), [src])

    x = torch.randn(5, 1, 28, 28)
    mtt = mtt_convnet(1, 10, 4, 2, (28, 28), norm=norm, pooling=pool).eval()
    with ExpertSet(tmp_path / "imp") as es:
        assert len(es) == 2 and es.epochs == 2
        net = build_model(es.spec).eval()
        fm = FlatModel(net)
        for i in range(2):
            for e in range(3):
                with torch.no_grad():
                    for p, v in zip(mtt.parameters(), buffer[i][e], strict=True):
                        p.copy_(v)
                    fm.load_(es.files[i].rows("trajectory", [e])[0])
                    assert_close(net(x), mtt(x), atol=1e-5, rtol=1e-5)


def test_rgb_images_and_a_trajectory_row_is_the_snapshot_in_order(tmp_path):
    data = make_image_folder(tmp_path / "data", per_split=(3, 2))
    torch.manual_seed(1)
    nets = [mtt_convnet(3, 2, 4, 2, (8, 8))]
    buffer = mtt_buffer(nets, n_snapshots=4)
    src = _save(tmp_path / "b.pt", buffer)
    experts_import.run(
        ImportSettings(
            dataset="imagefolder", data_dir=data, zca=False, width=4, depth=2, threads=1, out=tmp_path / "imp"
        ),
        [src],
    )
    t, meta = storage.load_tensors(expert_path(tmp_path / "imp", 0), "dpd.trajectory")
    want = torch.stack([torch.cat([p.reshape(-1) for p in snap]) for snap in buffer[0]])
    assert torch.equal(t["trajectory"], want)
    assert [name for name, _ in meta["layout"]] == [
        "conv1.weight",
        "conv1.bias",
        "norm1.weight",
        "norm1.bias",
        "conv2.weight",
        "conv2.bias",
        "norm2.weight",
        "norm2.bias",
        "fc.weight",
        "fc.bias",
    ]
    x = torch.rand(3, 3, 8, 8)
    net = build_model(ExpertSet(tmp_path / "imp").spec).eval()
    FlatModel(net).load_(t["trajectory"][3])
    with torch.no_grad():
        mtt = nets[0].eval()  # its parameters are the last snapshot's
        assert_close(net(x), mtt(x), atol=1e-5, rtol=1e-5)


def test_manifest_records_where_experts_came_from_and_what_is_unknown(tmp_path):
    a = _save(tmp_path / "replay_buffer_0.pt", mtt_buffer(_fmnist_nets(2), 3))
    result = experts_import.run(_settings(tmp_path / "imp", lr=0.01, batch=256), [a])
    manifest = json.loads((tmp_path / "imp" / "experts.json").read_text())
    record = manifest["import"]
    assert record["format"] == "mtt-replay-buffer"
    assert record["sources"] == [
        {
            "file": str(a.resolve()),
            "sha256": hashlib.sha256(a.read_bytes()).hexdigest(),
            "bytes": a.stat().st_size,
            "n_experts": 2,
            "experts": [0, 1],
        }
    ]
    assert record["unknown"] == ["momentum", "weight_decay", "dsa", "seed", "test_accuracy"]
    compat = manifest["compat"]
    assert (compat["epochs"], compat["lr"], compat["batch"], compat["momentum"], compat["seed"]) == (
        2,
        0.01,
        256,
        None,
        None,
    )
    assert (compat["dataset"], compat["zca"], compat["train_per_class"], compat["val_per_class"]) == (
        "fashion-mnist-mini",
        False,
        None,
        None,
    )
    # What `dpd distill` adopts from a folder.
    settings = manifest["settings"]
    assert {
        k: settings[k] for k in ("dataset", "zca", "model", "width", "depth", "norm", "pool", "train_per_class")
    } == {
        "dataset": "fashion-mnist-mini",
        "zca": False,
        "model": "convnet",
        "width": 4,
        "depth": 2,
        "norm": "instance",
        "pool": "avg",
        "train_per_class": None,
    }
    _, meta = storage.load_tensors(expert_path(tmp_path / "imp", 1), "dpd.trajectory")
    assert meta["source"] == {
        "format": "mtt-replay-buffer",
        "file": str(a.resolve()),
        "sha256": record["sources"][0]["sha256"],
        "position": 1,
    }
    assert meta["lr"] == 0.01 and meta["momentum"] is None and "test_accuracy" not in meta
    assert result["unknown"] == record["unknown"] and result["n_experts"] == 2 and result["converted"] == 2


def test_preprocessing_is_mtts_and_what_dpd_experts_writes(tmp_path):
    kornia = pytest.importorskip("kornia")
    data = make_image_folder(tmp_path / "data", per_split=(6, 2))
    src = _save(tmp_path / "b.pt", mtt_buffer([mtt_convnet(3, 2, 4, 2, (8, 8))], 2))
    experts_import.run(
        ImportSettings(
            dataset="imagefolder", data_dir=data, zca=True, width=4, depth=2, threads=1, out=tmp_path / "imp"
        ),
        [src],
    )
    t, _ = storage.load_tensors(tmp_path / "imp" / "preprocess.safetensors", "dpd.preprocess")
    # MTT: ToTensor() only (raw [0, 1] pixels, no normalisation), then kornia's ZCAWhitening(eps=0.1).
    import numpy as np
    from PIL import Image

    files = sorted((data / "train").glob("*/*.png"))
    raw = torch.stack(
        [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255 for f in files]
    )
    zca = kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True).fit(raw)
    assert torch.equal(t["norm_mean"], torch.zeros(3)) and torch.equal(t["norm_std"], torch.ones(3))
    assert_close(t["zca_mean"], zca.mean_vector.reshape(-1), atol=1e-6)
    assert_close(t["zca_matrix"], zca.transform_matrix, atol=2e-4)
    # The same file `dpd experts` writes for these settings.
    experts_engine.run(
        ExpertSettings(
            dataset="imagefolder",
            data_dir=data,
            zca=True,
            width=4,
            depth=2,
            num=1,
            epochs=1,
            threads=1,
            device="cpu",
            out=tmp_path / "trained",
        )
    )
    ours = json.loads((tmp_path / "imp" / "experts.json").read_text())
    theirs = json.loads((tmp_path / "trained" / "experts.json").read_text())
    assert ours["preprocess_fingerprint"] == theirs["preprocess_fingerprint"]
    assert ours["compat"]["preprocess_scheme"] == theirs["compat"]["preprocess_scheme"]


def test_no_zca_normalises_with_the_datasets_constants(tmp_path):
    src = _save(tmp_path / "b.pt", mtt_buffer(_fmnist_nets(1), 2))
    experts_import.run(_settings(tmp_path / "imp"), [src])
    t, _ = storage.load_tensors(tmp_path / "imp" / "preprocess.safetensors", "dpd.preprocess")
    assert_close(t["norm_mean"], [0.2861], atol=1e-7) and assert_close(t["norm_std"], [0.3530], atol=1e-7)
    assert "zca_matrix" not in t


# --- reruns -----------------------------------------------------------------------------------------
def test_rerun_skips_imported_buffers_without_loading_them(tmp_path, monkeypatch):
    a = _save(tmp_path / "replay_buffer_0.pt", mtt_buffer(_fmnist_nets(2), 3))
    experts_import.run(_settings(tmp_path / "imp"), [a])
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "imp").iterdir()}

    def no_load(path):
        raise AssertionError(f"{path} was loaded again")

    monkeypatch.setattr(replay_buffer, "load", no_load)
    moved = a.rename(tmp_path / "renamed.pt")  # identified by content, not by name
    result = experts_import.run(_settings(tmp_path / "imp"), [moved])
    assert result["files"] == [{"file": str(moved), "n_experts": 2, "converted": 0, "skipped": True}]
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "imp").iterdir()}
    assert {k: v for k, v in after.items() if k not in ("experts.json", ".lock")} == {
        k: v for k, v in before.items() if k not in ("experts.json", ".lock")
    }


def test_rerun_after_a_stop_converts_the_rest_and_a_deleted_expert(tmp_path):
    buffer = mtt_buffer(_fmnist_nets(3), 3)
    a = _save(tmp_path / "replay_buffer_0.pt", buffer)

    with pytest.raises(interrupt.Interrupted, match="Rerun the same command"):
        experts_import.run(_settings(tmp_path / "imp"), [a], StopWhen(lambda e: isinstance(e, ImportExpert)))
    interrupt.clear()
    assert sorted(p.name for p in (tmp_path / "imp").glob("expert_*")) == ["expert_00000.safetensors"]
    first = (tmp_path / "imp" / "expert_00000.safetensors").stat().st_mtime_ns
    result = experts_import.run(_settings(tmp_path / "imp"), [a])
    assert result["files"][0]["converted"] == 2
    assert (tmp_path / "imp" / "expert_00000.safetensors").stat().st_mtime_ns == first
    expert_path(tmp_path / "imp", 1).unlink()
    assert experts_import.run(_settings(tmp_path / "imp"), [a])["converted"] == 1
    for i in range(3):
        t, meta = storage.load_tensors(expert_path(tmp_path / "imp", i), "dpd.trajectory")
        position = meta["source"]["position"]
        assert torch.equal(
            t["trajectory"], torch.stack([torch.cat([p.reshape(-1) for p in s]) for s in buffer[position]])
        )
    assert json.loads((tmp_path / "imp" / "experts.json").read_text())["import"]["sources"][0]["n_experts"] == 3


def test_a_folder_contributes_its_buffers_in_order_of_n(tmp_path):
    buffers = tmp_path / "buffers"
    buffers.mkdir()
    _save(buffers / "replay_buffer_10.pt", mtt_buffer(_fmnist_nets(1, seed=10), 2))
    _save(buffers / "replay_buffer_2.pt", mtt_buffer(_fmnist_nets(1, seed=2), 2))
    (buffers / "notes.txt").write_text("not a buffer")
    result = experts_import.run(_settings(tmp_path / "imp"), [buffers, buffers / "replay_buffer_2.pt"])
    assert [Path(r["file"]).name for r in result["files"]] == ["replay_buffer_2.pt", "replay_buffer_10.pt"]
    _, meta = storage.load_tensors(expert_path(tmp_path / "imp", 1), "dpd.trajectory")
    assert meta["source"]["file"].endswith("replay_buffer_10.pt")


# --- refusals -----------------------------------------------------------------------------------------
class Foo:
    pass


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    good = mtt_buffer(_fmnist_nets(1), 2)
    _save(tmp / "good.pt", good)
    blob = (tmp / "good.pt").read_bytes()
    cases = {}

    def case(name, data, message):
        p = tmp / f"{name}.pt"
        if isinstance(data, bytes):
            p.write_bytes(data)
        else:
            torch.save(data, p)
        cases[name] = (p, message.format(p=p))

    case(
        "empty", b"", "{p} is empty (0 bytes): not a replay buffer. Copy it again from where the experts were trained."
    )
    case(
        "truncated", blob[: len(blob) // 2], "{p} is not a readable PyTorch file ("
    )  # the reason depends on where it was cut
    case(
        "pickled-object",
        [Foo()],
        "{p} holds pickled Python objects (" + Foo.__module__ + ".Foo), not only tensors and "
        "lists. dpd loads replay buffers with torch.load(weights_only=True) and never unpickles other objects",
    )
    case("plain-pickle", pickle.dumps([[[1.0]]]), "{p} is not a readable PyTorch file (")
    case("dict", {"a": torch.zeros(1)}, "{p} holds a dict (keys 'a') at the top level, expected a list of experts.")
    case(
        "tensor",
        torch.zeros(3),
        "{p} holds a float32 tensor of shape [3] at the top level, expected a list of experts.",
    )
    case("empty-list", [], "{p} holds an empty list at the top level, expected a list of experts.")
    case(
        "one-snapshot",
        [good[0][:1]],
        "{p}: expert 0 is a list of 1 snapshot(s), expected a list of at least two snapshots",
    )
    case(
        "int-parameter",
        [[good[0][0][:1] + [3] + good[0][0][2:], good[0][1]]],
        "{p}: expert 0, snapshot 0, parameter 1 is an int, expected a floating-point tensor.",
    )
    case(
        "long-tensor",
        [[[good[0][0][0].long(), *good[0][0][1:]], good[0][1]]],
        "{p}: expert 0, snapshot 0, parameter 0 is a int64 tensor of shape [4, 1, 3, 3], expected a floating-point tensor.",
    )
    case(
        "wider",
        mtt_buffer([mtt_convnet(1, 10, 8, 2, (28, 28))], 2),
        "{p}: expert 0, snapshot 0: parameter 0 has shape [8, 1, 3, 3], but parameter 0 of dpd's convnet-w4-d2-instance-avg "
        "for fashion-mnist-mini (1x28x28 images, 10 classes) (conv1.weight) has shape [4, 1, 3, 3]. The buffer holds another "
        "network; give the --dataset and the --width/--depth/--norm/--pool it was trained with",
    )
    case(
        "no-norm",
        mtt_buffer([mtt_convnet(1, 10, 4, 2, (28, 28), norm="none")], 2),
        "{p}: expert 0, snapshot 0: parameter 2 has shape [4, 4, 3, 3], but parameter 2 of dpd's convnet-w4-d2-instance-avg",
    )
    case(
        "deeper",
        mtt_buffer([mtt_convnet(1, 10, 4, 3, (28, 28))], 2),
        "{p}: expert 0, snapshot 0: parameter 8 has shape [4, 4, 3, 3], but parameter 8 of dpd's convnet-w4-d2-instance-avg",
    )
    case(
        "other-classes",
        mtt_buffer([mtt_convnet(1, 100, 4, 2, (28, 28))], 2),
        "{p}: expert 0, snapshot 0: parameter 8 has shape [100, 256], but parameter 8 of dpd's convnet-w4-d2-instance-avg",
    )
    case(
        "missing-parameter",
        [[s[:-1] for s in good[0]]],
        "{p}: expert 0, snapshot 0 holds 9 parameter tensors, dpd's convnet-w4-d2-instance-avg for fashion-mnist-mini "
        "(1x28x28 images, 10 classes) has 10 (conv1.weight, conv1.bias, norm1.weight",
    )
    case("ragged", [good[0], good[0] + [good[0][1]]], "{p}: expert 1 has 3 snapshots, expert 0 has 2; every expert")
    nan = [[p.clone() for p in s] for s in good[0]]
    nan[1][4][0, 0, 0, 0] = float("nan")
    case("nan", [nan], "{p}: expert 0 holds NaN or Inf parameters from snapshot 1 on (it diverged).")
    same = [good[0][0], good[0][0]]  # what MTT's buffer.py saves when trained on a CPU: aliased snapshots
    case("aliased", [same], "{p}: expert 0's snapshots 0 and 1 are identical. MTT's buffer.py trained on a CPU saves")
    return cases


def test_bad_buffers_are_refused_naming_the_path_and_what_was_found(tmp_path):
    cases = _bad_files(tmp_path)
    for name, (path, message) in cases.items():
        out = tmp_path / f"out-{name}"
        with pytest.raises(UserError) as e:
            experts_import.run(_settings(out), [path])
        assert str(e.value).startswith(message), (name, str(e.value))
        if name in ("truncated", "plain-pickle"):
            assert str(e.value).endswith(
                "): it is truncated, corrupted or of another format. Copy it again from where the experts were trained."
            ), str(e.value)
        assert not out.exists(), name  # nothing half-written: not even the folder


def test_buffers_of_different_lengths_convert_nothing(tmp_path):
    a = _save(tmp_path / "a.pt", mtt_buffer(_fmnist_nets(1), 3))
    b = _save(tmp_path / "b.pt", mtt_buffer(_fmnist_nets(2, seed=5), 4))
    out = tmp_path / "new" / "parents" / "imp"
    with pytest.raises(ExpertsError) as e:
        experts_import.run(_settings(out), [a, b])
    assert str(e.value) == (
        f"{b}: its experts have 3 epochs, those of {a} have 2. One folder holds experts of one length: import them "
        "into separate --out folders. Nothing was converted."
    )
    assert not (tmp_path / "new").exists()  # nor the parents the import made for --out
    experts_import.run(_settings(tmp_path / "imp"), [a])
    c = _save(tmp_path / "c.pt", mtt_buffer(_fmnist_nets(1, seed=7), 3))
    with pytest.raises(ExpertsError, match=r"d\.pt: its experts have 3 epochs, those in .* have 2\. One folder"):
        experts_import.run(_settings(tmp_path / "imp"), [c, _save(tmp_path / "d.pt", mtt_buffer(_fmnist_nets(1), 4))])
    assert [p.name for p in (tmp_path / "imp").glob("expert_*")] == ["expert_00000.safetensors"]  # c not added


def test_a_refused_import_removes_the_folders_it_made(tmp_path):
    src = _save(tmp_path / "b.pt", mtt_buffer(_fmnist_nets(1), 2))
    with pytest.raises(UserError, match="The buffer holds another network"):
        experts_import.run(_settings(tmp_path / "x" / "y" / "imp", width=8), [src])
    assert list(tmp_path.iterdir()) == [src]


def test_settings_must_name_the_dataset_and_zca(tmp_path):
    src = _save(tmp_path / "b.pt", mtt_buffer(_fmnist_nets(1), 2))
    with pytest.raises(SettingsError) as e:
        experts_import.run(ImportSettings(width=4, depth=2, out=tmp_path / "imp"), [src])
    assert str(e.value).startswith(
        "`dpd experts import` needs --dataset (the dataset the buffers' experts were trained on) and "
        "--zca or --no-zca (whether they were trained on ZCA-whitened images"
    )
    with pytest.raises(SettingsError, match=r"needs --zca or --no-zca \("):
        experts_import.run(ImportSettings(dataset="fashion-mnist-mini", width=4, depth=2, out=tmp_path / "imp"), [src])
    with pytest.raises(StorageError, match="does not exist"):
        experts_import.run(_settings(tmp_path / "imp"), [tmp_path / "nope.pt"])
    assert not (tmp_path / "imp").exists()


def test_imported_and_trained_experts_never_share_a_folder(tmp_path):
    src = _save(tmp_path / "b.pt", mtt_buffer(_fmnist_nets(1), 2))
    experts_import.run(_settings(tmp_path / "imp"), [src])
    with pytest.raises(ExpertsError, match="holds experts imported from replay buffers"):
        experts_engine.run(
            ExpertSettings(
                width=4, depth=2, num=1, epochs=2, train_per_class=2, threads=1, device="cpu", out=tmp_path / "imp"
            )
        )
    experts_engine.run(
        ExpertSettings(
            width=4, depth=2, num=1, epochs=2, train_per_class=2, threads=1, device="cpu", out=tmp_path / "trained"
        )
    )
    with pytest.raises(ExpertsError, match="holds experts trained by `dpd experts`, not imported ones"):
        experts_import.run(_settings(tmp_path / "trained"), [src])
    with pytest.raises(
        ExpertsError, match=r"imported with other settings \(zca: folder has False, settings say True\)"
    ):
        experts_import.run(_settings(tmp_path / "imp", zca=True), [src])
    with pytest.raises(ExpertsError, match=r"lr: folder has None, settings say 0\.1"):
        experts_import.run(_settings(tmp_path / "imp", lr=0.1), [src])
