"""The dataset registry: embedded mini set, IDX reader, seeded subsets, image folders."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpd_cli.data import load_dataset
from dpd_cli.data.datasets import FASHION_CLASSES, MINI_DIR, NORMALIZATION, read_idx
from dpd_cli.errors import DataError
from tests.helpers import make_image_folder


@pytest.fixture(scope="module")
def mini():
    return load_dataset("fashion-mnist-mini")


# ----------------------------------------------------------------------------------------------
# Embedded mini set


def test_mini_shapes_and_dtypes(mini):
    assert mini.train_images.shape == (5000, 1, 28, 28)
    assert mini.test_images.shape == (1000, 1, 28, 28)
    assert mini.train_images.dtype == torch.uint8 and mini.test_images.dtype == torch.uint8
    assert mini.train_labels.dtype == torch.int64 and mini.test_labels.dtype == torch.int64
    assert mini.train_labels.shape == (5000,) and mini.test_labels.shape == (1000,)
    assert mini.image_shape == (1, 28, 28)
    assert mini.classes == FASHION_CLASSES and mini.n_classes == 10
    assert (mini.mean, mini.std) == NORMALIZATION["fashion-mnist-mini"]


def test_mini_labels_and_balance(mini):
    assert set(mini.train_labels.unique().tolist()) == set(range(10))
    assert mini.class_counts() == [500] * 10
    assert torch.bincount(mini.test_labels, minlength=10).tolist() == [100] * 10


def test_mini_images_are_not_blank(mini):
    # A decoding bug (wrong offset) would give a constant or shifted image; real clothes span 0..255.
    x = mini.train_images
    assert x.min() == 0 and x.max() == 255
    assert 0.2 < x.float().mean().item() / 255 < 0.4  # the published mean is 0.2861


def test_train_per_class_subset_balanced_and_seeded(mini):
    a = load_dataset("fashion-mnist-mini", train_per_class=7, seed=1)
    b = load_dataset("fashion-mnist-mini", train_per_class=7, seed=1)
    c = load_dataset("fashion-mnist-mini", train_per_class=7, seed=2)
    assert a.class_counts() == [7] * 10 and a.train_images.shape == (70, 1, 28, 28)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.train_labels, b.train_labels)
    assert not torch.equal(a.train_images, c.train_images)
    # The test set is untouched, and every subset image is a real training image with its label.
    assert torch.equal(a.test_images, mini.test_images)
    flat = mini.train_images.flatten(1)
    for img, label in zip(a.train_images[:10], a.train_labels[:10]):
        hits = (flat == img.flatten()).all(1).nonzero().flatten()
        assert len(hits) >= 1 and label in mini.train_labels[hits]


def test_train_per_class_too_many():
    with pytest.raises(DataError, match=r"--train-per-class 501 is more than the smallest class .* \(500\)"):
        load_dataset("fashion-mnist-mini", train_per_class=501)


# ----------------------------------------------------------------------------------------------
# IDX reader


def _idx_bytes(array: torch.Tensor) -> bytes:
    head = struct.pack(">HBB", 0, 0x08, array.dim()) + struct.pack(">" + "I" * array.dim(), *array.shape)
    return head + array.numpy().tobytes()


def test_read_idx_plain_and_gzipped(tmp_path):
    x = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    (tmp_path / "a-idx3-ubyte").write_bytes(_idx_bytes(x))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(x)))
    assert torch.equal(read_idx(tmp_path / "a-idx3-ubyte"), x)
    assert torch.equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), x)


def test_read_idx_mini_file_matches_loader(mini):
    assert torch.equal(read_idx(MINI_DIR / "t10k-labels-idx1-ubyte.gz").long(), mini.test_labels)


@pytest.mark.parametrize(
    "blob",
    [
        pytest.param(lambda b: b[:-1], id="truncated-body"),
        pytest.param(lambda b: b[:6], id="truncated-shape"),
        pytest.param(lambda b: b[:2], id="truncated-magic"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b + b"\x00", id="padded"),
        pytest.param(lambda b: b"\x00\x00\x0d\x03" + b[4:], id="float-dtype"),
    ],
)
def test_read_idx_bad_files_raise_data_error(tmp_path, blob):
    x = torch.randint(0, 256, (2, 3, 3), dtype=torch.uint8)
    p = tmp_path / "bad-idx3-ubyte"
    p.write_bytes(blob(_idx_bytes(x)))
    with pytest.raises(DataError, match="is not a readable IDX file"):
        read_idx(p)


def test_read_idx_truncated_gzip(tmp_path):
    x = torch.randint(0, 256, (20, 8, 8), dtype=torch.uint8)
    p = tmp_path / "bad-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(_idx_bytes(x))[:-30])
    with pytest.raises(DataError, match="is not a readable IDX file"):
        read_idx(p)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError):
        read_idx(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------
# Image folders


def test_imagefolder_loads(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    ds = load_dataset("imagefolder", data_dir=root)
    assert ds.classes == ["cat", "dog"]
    assert ds.train_images.shape == (6, 3, 8, 8) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (4, 3, 8, 8)
    assert ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.test_labels.tolist() == [0, 0, 1, 1]
    # Pixels are decoded in (C, H, W) order.
    png = torch.from_numpy(np.array(Image.open(root / "train" / "dog" / "1.png")))
    assert torch.equal(ds.train_images[4], png.permute(2, 0, 1))
    expected_mean = (ds.train_images.double() / 255).mean(dim=(0, 2, 3))
    torch.testing.assert_close(torch.tensor(ds.mean, dtype=torch.float64), expected_mean)


def test_imagefolder_second_load_hits_cache(tmp_path, monkeypatch):
    import dpd_cli.data.datasets as datasets
    from dpd_cli.io import paths

    root = make_image_folder(tmp_path / "imgs")
    first = load_dataset("imagefolder", data_dir=root)
    caches = list(paths.cache_root().glob("imagefolder-*.safetensors"))
    assert len(caches) == 1 and caches[0].parent == tmp_path / "cache-root"

    def no_decode(*a, **k):
        raise AssertionError("decoded again although the cache exists")

    monkeypatch.setattr(datasets, "_decode", no_decode)
    second = load_dataset("imagefolder", data_dir=root)
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_labels, second.test_labels)
    assert first.classes == second.classes and first.mean == pytest.approx(second.mean)


def test_imagefolder_broken_cache_is_rebuilt(tmp_path):
    from dpd_cli.io import paths

    root = make_image_folder(tmp_path / "imgs")
    first = load_dataset("imagefolder", data_dir=root)
    (cache,) = paths.cache_root().glob("imagefolder-*.safetensors")
    cache.write_bytes(b"garbage")
    again = load_dataset("imagefolder", data_dir=root)
    assert torch.equal(first.train_images, again.train_images)
    assert cache.stat().st_size > 100  # rewritten


def test_imagefolder_class_mismatch(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    (root / "test" / "dog").rename(root / "test" / "bird")
    with pytest.raises(
        DataError, match=r"train/ and test/ have different class folders \(\['cat', 'dog'\] vs \['bird', 'cat'\]\)"
    ):
        load_dataset("imagefolder", data_dir=root)


def test_imagefolder_without_splits(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="is not an image folder"):
        load_dataset("imagefolder", data_dir=tmp_path / "flat")


def test_imagefolder_undecodable_image(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    (root / "train" / "dog" / "9.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="Could not decode an image"):
        load_dataset("imagefolder", data_dir=root)


def test_imagefolder_needs_data_dir():
    with pytest.raises(DataError, match="Dataset imagefolder needs --data-dir"):
        load_dataset("imagefolder")


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=missing)
    assert str(info.value) == f"--data-dir {missing} does not exist. Point it at the folder holding the mnist files."


def test_idx_dataset_from_data_dir_missing_files(tmp_path):
    # mnist from a folder without the IDX files must not try to download.
    (tmp_path / "mn").mkdir()
    with pytest.raises(DataError):
        load_dataset("mnist", data_dir=tmp_path / "mn")


# ----------------------------------------------------------------------------------------------
# Tiny ImageNet (both validation layouts)


def _tiny_imagenet(root: Path, split_val: bool) -> Path:
    """A miniature tiny-imagenet-200 folder: 2 wnids, train/<wnid>/images/*.JPEG, val as published or split."""
    g = torch.Generator().manual_seed(1)
    wnids = ["n01443537", "n01629819"]

    def save(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(arr, "RGB").save(path, format="JPEG")

    for w in wnids:
        for i in range(3):
            save(root / "train" / w / "images" / f"{w}_{i}.JPEG")
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for i, w in enumerate([wnids[1], wnids[0], wnids[1]]):
        name = f"val_{i}.JPEG"
        save(root / "val" / "images" / (f"{w}/{name}" if split_val else name))
        lines.append(f"{name}\t{w}\t0\t0\t7\t7")
    if not split_val:
        (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("split_val", [False, True])
def test_tiny_imagenet_loads_both_val_layouts(tmp_path, split_val):
    from dpd_cli.data.datasets import NORMALIZATION

    root = _tiny_imagenet(tmp_path / "tiny", split_val)
    ds = load_dataset("tiny-imagenet", data_dir=root)
    assert ds.name == "tiny-imagenet" and ds.classes == ["n01443537", "n01629819"]
    assert ds.train_images.shape == (6, 3, 8, 8) and ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert sorted(ds.test_labels.tolist()) == [0, 1, 1] and len(ds.test_images) == 3
    if not split_val:  # annotation order: val_0 -> wnid 1, val_1 -> wnid 0, val_2 -> wnid 1
        assert ds.test_labels.tolist() == [1, 0, 1]
        png = torch.from_numpy(np.array(Image.open(root / "val" / "images" / "val_1.JPEG").convert("RGB")))
        assert torch.equal(ds.test_images[1], png.permute(2, 0, 1))
    assert (ds.mean, ds.std) == NORMALIZATION["tiny-imagenet"]


def test_tiny_imagenet_bad_annotations(tmp_path):
    root = _tiny_imagenet(tmp_path / "tiny", split_val=False)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t7\t7\n")
    with pytest.raises(DataError, match=r"line 1: expected '<file>\\t<wnid>' with a wnid from train/"):
        load_dataset("tiny-imagenet", data_dir=root)


def test_tiny_imagenet_needs_its_layout(tmp_path):
    root = make_image_folder(tmp_path / "imgs")  # train/ and test/, no val/
    with pytest.raises(DataError, match="is not a Tiny ImageNet folder"):
        load_dataset("tiny-imagenet", data_dir=root)
    with pytest.raises(DataError, match="Dataset tiny-imagenet needs --data-dir"):
        load_dataset("tiny-imagenet")
