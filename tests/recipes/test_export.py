"""``dpd export``: each format loads back, with plain torch / numpy / PIL, as the same set.

The sets here are written directly with the synthetic-set writer (no distillation needed): random
images in a ZCA-whitened or normalised space, with values that fall outside the pixel range so
that clipping is exercised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpd_cli.artifacts import export as export_files
from dpd_cli.artifacts.synthetic import load as load_synthetic
from dpd_cli.artifacts.synthetic import save_synthetic
from dpd_cli.config.settings import ExportSettings
from dpd_cli.data import Preprocess, fit_zca
from dpd_cli.errors import OutputExistsError, SettingsError, StorageError
from dpd_cli.io import storage
from dpd_cli.models import ModelSpec
from dpd_cli.recipes import export

CLASSES = ["airplane", "T-shirt/top", "frog's eye"]


def _make_set(
    path: Path,
    zca: bool,
    channels: int = 3,
    side: int = 8,
    ipc: int = 2,
    dataset: str = "cifar10",
    train_per_class: int | None = None,
) -> Path:
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (40, channels, side, side), generator=g, dtype=torch.uint8)
    if zca:
        c = channels
        pre = Preprocess(torch.zeros(c), torch.ones(c))
        pre.zca_mean, pre.zca_matrix, pre.zca_inverse = fit_zca(pre.normalize(pixels))
    else:
        pre = Preprocess(torch.tensor([0.49, 0.48, 0.45][:channels]), torch.tensor([0.2, 0.25, 0.3][:channels]))
    n = ipc * len(CLASSES)
    images = pre.apply(pixels[:n]) + 0.3 * torch.randn(n, channels, side, side, generator=g)  # some leave [0, 1]
    labels = torch.arange(len(CLASSES)).repeat_interleave(ipc)
    spec = ModelSpec("convnet", channels, (side, side), len(CLASSES), width=4, depth=2)
    meta = {
        "dataset": dataset,
        "classes": CLASSES,
        "model": spec.to_dict(),
        "ipc": ipc,
        "iteration": 7,
        "iterations": 7,
        "zca": zca,
        "settings": {"train_per_class": train_per_class},
    }
    save_synthetic(path, images, labels, torch.tensor(0.0123), pre, meta)
    return path


def _export(target: Path, out: Path, fmt: str, force: bool = False) -> dict:
    return export.run(ExportSettings(format=fmt, out=out, force=force), target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _load_pt(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("zca", [True, False])
def test_mtt_files_load_with_plain_torch_as_the_same_tensors(tmp_path, zca):
    src = _make_set(tmp_path / "synthetic.safetensors", zca)
    t, meta = load_synthetic(src)
    result = _export(src, tmp_path / "out", "mtt")
    out = tmp_path / "out"
    images, labels, lr = (_load_pt(out / f) for f in ("images_best.pt", "labels_best.pt", "lr_best.pt"))
    assert images.dtype == torch.float32 and torch.equal(images, t["images"])
    assert labels.dtype == torch.int64 and torch.equal(labels, t["labels"])
    assert lr.dtype == torch.float32 and lr.shape == () and torch.equal(lr, t["lr"])
    norm = _load_pt(out / "normalization.pt")
    assert torch.equal(norm["mean"], t["norm_mean"]) and torch.equal(norm["std"], t["norm_std"])
    if zca:
        z = _load_pt(out / "zca.pt")
        assert set(z) == {"mean_vector", "transform_matrix", "transform_inv"}
        assert torch.equal(z["mean_vector"], t["zca_mean"].reshape(1, -1))
        assert torch.equal(z["transform_matrix"], t["zca_matrix"]) and torch.equal(z["transform_inv"], t["zca_inverse"])
    else:
        assert not (out / "zca.pt").exists()
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["images_best.pt", "labels_best.pt", "lr_best.pt", "normalization.pt", "README.txt", "export.json"]
        + (["zca.pt"] if zca else [])
    )
    assert result["files"] == [
        n
        for n in ["images_best.pt", "labels_best.pt", "lr_best.pt", "normalization.pt", "zca.pt"]
        if (out / n).exists()
    ]
    record = json.loads((out / "export.json").read_text())
    assert (record["format"], record["export_format"], record["source"], record["n_images"], record["zca"]) == (
        "dpd.export",
        "mtt",
        str(src.resolve()),
        6,
        zca,
    )
    readme = (out / "README.txt").read_text()
    for name in result["files"]:
        assert name in readme
    # What MTT's code does with these files, truthfully: it saves no lr_best.pt and loads no saved set.
    assert "MTT saves no learning rate" in readme and "none of MTT's scripts loads them" in readme
    (tmp_path / "made").mkdir()  # as a run directory is made: mkdir's mode, under the umask
    assert out.stat().st_mode & 0o777 == (tmp_path / "made").stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert "--dataset CIFAR10" + (" --zca" if zca else "") in readme
    assert ("kornia.enhance.ZCAWhitening(eps=0.1" in readme) == zca


def test_datm_labels_are_logits_whose_softmax_is_the_one_hot_label(tmp_path):
    src = _make_set(tmp_path / "s.safetensors", zca=False)
    _export(src, tmp_path / "out", "datm")
    labels = _load_pt(tmp_path / "out" / "labels_best.pt")
    hard = load_synthetic(src)[0]["labels"]
    assert labels.dtype == torch.float32 and labels.shape == (6, 3)
    assert torch.equal(F.softmax(labels, dim=1), F.one_hot(hard, 3).float())
    assert torch.equal(F.softmax(labels.double(), dim=1), F.one_hot(hard, 3).double())
    assert torch.equal(labels.argmax(1), hard)

    def datm_soft_cross_entropy(inputs, target):  # DATM's SoftCrossEntropy (distill/evaluation.py), written out
        return torch.sum(-F.log_softmax(inputs, dim=1) * F.softmax(target, dim=1)) / inputs.shape[0]

    logits = torch.randn(6, 3, dtype=torch.float64)
    assert torch.equal(
        datm_soft_cross_entropy(logits, labels.double()), F.cross_entropy(logits, hard, reduction="sum") / 6
    )
    assert "softmax is exactly the one-hot label" in (tmp_path / "out" / "README.txt").read_text()


def test_zca_pt_is_a_kornia_zcawhitening(tmp_path):
    kornia = pytest.importorskip("kornia")
    src = _make_set(tmp_path / "s.safetensors", zca=True)
    _export(src, tmp_path / "out", "mtt")
    t, _ = load_synthetic(src)
    pre = Preprocess.from_tensors(t)
    pixels = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    state = _load_pt(tmp_path / "out" / "zca.pt")
    loaded = kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True)
    loaded.load_state_dict(state)
    older = kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True)  # the README's way for kornia without the buffers
    older.mean_vector, older.transform_matrix, older.transform_inv = (
        state["mean_vector"],
        state["transform_matrix"],
        state["transform_inv"],
    )
    older.fitted = True
    for zca in (loaded, older):
        torch.testing.assert_close(zca(pixels.float() / 255), pre.apply(pixels), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            zca.inverse_transform(t["images"]), pre.invert(t["images"], clamp=False), atol=1e-5, rtol=1e-5
        )


def test_npz_loads_without_pickle_as_the_same_tensors(tmp_path):
    src = _make_set(tmp_path / "s.safetensors", zca=True)
    t, meta = load_synthetic(src)
    _export(src, tmp_path / "out", "npz")
    with np.load(tmp_path / "out" / "synthetic.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    assert set(arrays) == {
        "images",
        "labels",
        "lr",
        "norm_mean",
        "norm_std",
        "zca_mean",
        "zca_matrix",
        "zca_inverse",
        "classes",
        "meta_json",
    }
    for k in ("images", "labels", "lr", "norm_mean", "norm_std", "zca_mean", "zca_matrix", "zca_inverse"):
        assert arrays[k].dtype == t[k].numpy().dtype and np.array_equal(arrays[k], t[k].numpy()), k
    assert arrays["classes"].tolist() == CLASSES
    recorded = json.loads(str(arrays["meta_json"]))
    assert (recorded["dataset"], recorded["model"], recorded["ipc"]) == (meta["dataset"], meta["model"], 2)
    assert "format" not in recorded


@pytest.mark.parametrize(("zca", "channels"), [(True, 3), (False, 1)])
def test_imagefolder_pngs_are_the_images_in_pixel_space(tmp_path, zca, channels):
    from PIL import Image

    src = _make_set(tmp_path / "s.safetensors", zca, channels=channels)
    t, _ = load_synthetic(src)
    result = _export(src, tmp_path / "out", "imagefolder")
    # Back to pixels, written out in float64: undo the ZCA, de-normalise.
    x = t["images"].double().flatten(1)
    if zca:
        x = x @ t["zca_inverse"].double() + t["zca_mean"].double()
    x = x.view(t["images"].shape) * t["norm_std"].double().view(1, -1, 1, 1) + t["norm_mean"].double().view(1, -1, 1, 1)
    want = (x.clamp(0, 1) * 255).round()
    folders = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert folders == ["0-airplane", "1-T-shirt_top", "2-frog_s_eye"]  # sorted names give the class order
    for i, y in enumerate(t["labels"].tolist()):
        png = Image.open(tmp_path / "out" / folders[y] / f"{i}.png")
        assert png.mode == ("RGB" if channels == 3 else "L")
        got = torch.from_numpy(np.array(png)).double()
        got = got.permute(2, 0, 1) if channels == 3 else got[None]
        assert (got - want[i]).abs().max() <= 1  # float32 vs float64 at a rounding boundary
        assert (got == want[i]).double().mean() > 0.98
    clipped = float(((x < 0) | (x > 1)).double().mean())
    assert clipped > 0.01 and result["pixels_clipped"] == pytest.approx(clipped, abs=1e-3)
    assert f"{100 * clipped:.2f} % of the values lay outside [0, 1]" in (tmp_path / "out" / "README.txt").read_text()


def _with_soft_labels(src: Path, logits: torch.Tensor) -> Path:
    """A synthetic set with a ``label_logits`` tensor, as a set distilled with learnable soft labels holds."""
    t, meta = storage.load_tensors(src, "dpd.synthetic")
    meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "dpd_version")}
    out = src.with_name("soft.safetensors")
    storage.save_tensors(out, {**t, "label_logits": logits}, "dpd.synthetic", meta)
    return out


def test_soft_labels_are_exported_as_logits(tmp_path):
    src = _make_set(tmp_path / "s.safetensors", zca=False)
    logits = torch.randn(6, 3)
    soft = _with_soft_labels(src, logits)
    result = _export(soft, tmp_path / "datm", "datm")
    assert result["soft_labels"] is True
    assert torch.equal(_load_pt(tmp_path / "datm" / "labels_best.pt"), logits)
    assert "the learned soft labels as logits" in (tmp_path / "datm" / "README.txt").read_text()
    with pytest.raises(SettingsError) as e:  # MTT's evaluate_synset casts labels with .long()
        _export(soft, tmp_path / "mtt", "mtt")
    assert str(e.value) == (
        f"{soft} has learned soft labels, and --format mtt stores labels as int64 class indices: MTT's evaluate_synset "
        "casts them with .long(), so it cannot train on soft labels. Export the set with --format datm (labels_best.pt "
        "holds the logits; DATM's evaluation.py trains on their softmax) or --format npz."
    )
    assert not (tmp_path / "mtt").exists()
    _export(soft, tmp_path / "npz", "npz")
    with np.load(tmp_path / "npz" / "synthetic.npz") as z:
        assert np.array_equal(z["label_logits"], logits.numpy()) and np.array_equal(
            z["labels"], np.repeat([0, 1, 2], 2)
        )
    _export(soft, tmp_path / "png", "imagefolder")
    assert np.array_equal(np.load(tmp_path / "png" / "label_logits.npy"), logits.numpy())
    assert json.loads((tmp_path / "png" / "export.json").read_text())["soft_labels"] is True
    bad = _with_soft_labels(src, torch.randn(6, 4))
    with pytest.raises(
        StorageError, match=r"tensor 'label_logits' is torch.float32 \(6, 4\), expected finite float32 \(6, 3\)"
    ):
        _export(bad, tmp_path / "bad", "datm")
    assert not (tmp_path / "bad").exists()


def test_an_existing_out_is_replaced_only_with_force_and_only_if_it_is_an_export(tmp_path):
    src = _make_set(tmp_path / "s.safetensors", zca=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(OutputExistsError) as e:
        _export(src, mine, "npz")
    assert str(e.value) == (
        f"{mine} already exists. Add --force to replace it (only a folder that `dpd export` wrote, or an "
        "empty one, is replaced), or choose another --out."
    )
    with pytest.raises(
        OutputExistsError, match="is not a folder `dpd export` wrote .it has no export.json., so --force does not"
    ):
        _export(src, mine, "npz", force=True)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]

    out = tmp_path / "out"
    _export(src, out, "mtt")
    (out / "extra.txt").write_text("from the earlier export")
    with pytest.raises(OutputExistsError):
        _export(src, out, "npz")
    assert (out / "images_best.pt").exists()
    _export(src, out, "npz", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "export.json", "synthetic.npz"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _export(src, empty, "npz", force=True)
    with pytest.raises(OutputExistsError, match="holds the set being exported"):
        _export(out / ".." / "s.safetensors", tmp_path, "npz", force=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_a_failed_export_leaves_nothing_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    src = _make_set(tmp_path / "s.safetensors", zca=False)
    out = tmp_path / "out"
    real = export_files.write_npz

    def half_then_fail(folder, *a, **k):
        real(folder, *a, **k)
        raise KeyboardInterrupt  # e.g. Ctrl-C after the archive, before README.txt

    monkeypatch.setattr(export_files, "write_npz", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        _export(src, out, "npz")
    assert not out.exists()
    monkeypatch.undo()
    _export(src, out, "mtt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(export_files, "write_npz", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        _export(src, out, "npz", force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s.safetensors"]


def test_targets_and_required_settings(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _make_set(run / "synthetic.safetensors", zca=False)
    assert _export(run, tmp_path / "a", "npz")["source"] == str(run / "synthetic.safetensors")
    with pytest.raises(SettingsError) as e:
        export.run(ExportSettings(), run)
    assert str(e.value) == (
        "`dpd export` needs --format mtt|datm|imagefolder|npz and --out DIR: which files to write, and "
        "the folder to write them to."
    )
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "experts.json").write_text("{}")
    with pytest.raises(StorageError, match="is an experts folder"):
        _export(tmp_path / "ex", tmp_path / "b", "npz")
    with pytest.raises(StorageError, match="does not exist"):
        _export(tmp_path / "nope", tmp_path / "b", "npz")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(StorageError):
        _export(tmp_path / "junk.safetensors", tmp_path / "b", "npz")
    assert not (tmp_path / "b").exists()
