"""The dataset registry: every dataset becomes uint8 tensors ``[N, C, H, W]`` plus labels.

torchvision's datasets are downloaded into the dataset cache on first use, or read from ``--data-dir``;
image folders (``imagefolder``, ``tiny-imagenet``) are decoded once and cached.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from dpd_cli.errors import DataError
from dpd_cli.io import paths, storage

MINI_DIR = Path(__file__).parent / "mini"

FASHION_CLASSES = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot".split(",")

_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))

#: Per-channel (mean, std) in [0, 1] pixel units, used when ZCA is off: MTT's constants (CIFAR-10's for
#: CIFAR-100 too), else those of the dataset-condensation code MTT descends from (docs/algorithm.md).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist-mini": ((0.2861,), (0.3530,)),
    "fashion-mnist": ((0.2861,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": _CIFAR10_STATS,
    "cifar100": _CIFAR10_STATS,  # MTT normalises CIFAR-100 with CIFAR-10's constants
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "tiny-imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class Dataset:
    """A labelled image dataset held as uint8 tensors on the CPU.

    With a validation split, ``val_*`` hold the images taken out of the training set and
    ``val_indices`` their positions in the original training order; otherwise they are empty.
    """

    name: str
    classes: list[str]
    train_images: torch.Tensor  # (N, C, H, W) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor  # (M, C, H, W) uint8
    test_labels: torch.Tensor  # (M,) int64
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_images: torch.Tensor | None = None  # (V, C, H, W) uint8
    val_labels: torch.Tensor | None = None  # (V,) int64
    val_indices: torch.Tensor | None = None  # (V,) int64, into the original training set

    @property
    def val_fingerprint(self) -> str | None:
        """Identifies the validation split: SHA-256 (16 hex digits) of its indices and labels."""
        if self.val_indices is None:
            return None
        h = hashlib.sha256(self.val_indices.numpy().tobytes())
        h.update(self.val_labels.numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    def class_counts(self) -> list[int]:
        return torch.bincount(self.train_labels, minlength=self.n_classes).tolist()


def read_idx(path: Path) -> torch.Tensor:
    """Read one (optionally gzipped) IDX file, the MNIST family's format, as a uint8 tensor."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
            raise ValueError("not a uint8 IDX file")
        shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        n, body = math.prod(shape), data[4 + 4 * ndim :]
        if len(body) != n:
            raise ValueError(f"expected {n} bytes of data, found {len(body)}")
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise DataError(
            f"{path} is not a readable IDX file ({e}). Re-download the dataset or point --data-dir elsewhere."
        ) from e
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)


def _load_idx_dataset(name: str, folder: Path, classes: list[str]) -> Dataset:
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    found = {s: _find_idx(folder, s) for s in stems}
    missing = [s for s, p in found.items() if p is None]
    if missing:
        raise DataError(
            f"{folder} does not hold the {name} files: missing {', '.join(m + '[.gz]' for m in missing)}. "
            f"Point --data-dir at the folder with the four IDX files, or leave it out to download."
        )
    tr_x, tr_y, te_x, te_y = (read_idx(found[s]) for s in stems)  # type: ignore[arg-type]
    if tr_x.shape[0] != tr_y.shape[0] or te_x.shape[0] != te_y.shape[0]:
        raise DataError(f"{folder}: image and label files of {name} have different lengths. Re-download the dataset.")
    mean, std = NORMALIZATION[name]
    return Dataset(
        name, classes, tr_x[:, None].contiguous(), tr_y.long(), te_x[:, None].contiguous(), te_y.long(), mean, std
    )


#: What a given --data-dir must hold for the torchvision datasets read through torchvision.
_EXPECTED = {
    "cifar10": ("cifar-10-batches-py/",),
    "cifar100": ("cifar-100-python/",),
    "svhn": ("train_32x32.mat", "test_32x32.mat"),
}


def _torchvision(name: str, data_dir: Path | None) -> Dataset:
    import torchvision.datasets as tvd

    if name not in _EXPECTED and name not in ("mnist", "fashion-mnist"):
        raise DataError(f"unknown dataset {name!r}")
    root = Path(data_dir) if data_dir is not None else paths.data_root()
    download = data_dir is None
    try:
        if name in ("mnist", "fashion-mnist"):
            cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
            raw = root / cls.__name__ / "raw"
            if download:
                for train in (True, False):
                    cls(str(root), train=train, download=True)
            # Files given directly (the four IDX files in data_dir) or torchvision's layout. A given
            # folder is read as it is (never downloaded into), so a missing file is named, not guessed.
            folder = raw if download or _find_idx(raw, "train-images-idx3-ubyte") else root
            classes = FASHION_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
            return _load_idx_dataset(name, folder, classes)
        if data_dir is not None and not all((root / f).exists() for f in _EXPECTED[name]):
            raise DataError(
                f"--data-dir {root} does not hold the {name} files: expected {' and '.join(_EXPECTED[name])} in it "
                f"(as torchvision unpacks them). Point --data-dir at the folder holding them, or leave it out to download."
            )
        if name == "svhn":
            tr, te = (tvd.SVHN(str(root), split=split, download=download) for split in ("train", "test"))
            classes = [str(i) for i in range(10)]
            (tr_x, tr_y), (te_x, te_y) = ((torch.from_numpy(d.data), torch.from_numpy(d.labels)) for d in (tr, te))
        else:
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            tr, te = (cls(str(root), train=train, download=download) for train in (True, False))
            classes = list(tr.classes)
            # (N, H, W, C) -> (N, C, H, W)
            (tr_x, tr_y), (te_x, te_y) = (
                (torch.from_numpy(d.data).permute(0, 3, 1, 2), torch.tensor(d.targets)) for d in (tr, te)
            )
    except ImportError as e:  # SVHN's .mat files need scipy
        raise DataError(
            f"Reading {name} needs the package {e.name or 'scipy'}: `pip install {e.name or 'scipy'}`."
        ) from e
    except (RuntimeError, OSError) as e:
        how = "could not be downloaded" if download else f"was not found in {root}"
        raise DataError(
            f"Dataset {name} {how} ({e}). Download it on a machine with internet access and pass "
            f"--data-dir to the folder holding it, or set DPD_DATA_ROOT."
        ) from e
    mean, std = NORMALIZATION[name]
    return Dataset(name, classes, tr_x.contiguous(), tr_y.long(), te_x.contiguous(), te_y.long(), mean, std)


def _list_images(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    # Any depth below the class folder (Tiny ImageNet keeps train/<wnid>/images/*.JPEG).
    files = [(label, sorted((split_dir / c).rglob("*"))) for label, c in enumerate(classes)]
    return classes, [
        (f, label) for label, fs in files for f in fs if f.suffix.lower() in _IMAGE_SUFFIXES and f.is_file()
    ]


def _decode(items: list[tuple[Path, int]], mode: str, size: tuple[int, int]) -> torch.Tensor:
    def one(item):
        with Image.open(item[0]) as im:
            im = im.convert(mode)
            if im.size != size:
                im = im.resize(size, Image.BILINEAR)
            return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.size[1], im.size[0], -1)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return torch.stack(list(pool.map(one, items))).permute(0, 3, 1, 2).contiguous()


def _imagefolder(root: Path) -> tuple[list[str], list, list]:
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise DataError(
            f"{root} is not an image folder: it needs train/<class>/<images> and test/<class>/<images>. "
            f"For the CIFAR-10 JPEG copy, unpack the archive and point --data-dir at the unpacked folder."
        )
    classes, train_items = _list_train(train_dir)
    test_classes, test_items = _list_images(test_dir)
    if test_classes != classes:
        raise DataError(f"{root}: train/ and test/ have different class folders ({classes} vs {test_classes}).")
    return classes, train_items, test_items


def _tiny_imagenet(root: Path) -> tuple[list[str], list, list]:
    """Tiny ImageNet (200 classes, 64x64): ``train/<wnid>/images/*.JPEG``; the labelled validation set
    serves as the test set, either as published (``val/images/*.JPEG`` + ``val/val_annotations.txt``)
    or split into class folders (``val/images/<wnid>/*.JPEG``, the layout MTT's code reads)."""
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise DataError(
            f"{root} is not a Tiny ImageNet folder: it needs train/<wnid>/images/*.JPEG and val/ "
            "(the unpacked tiny-imagenet-200 archive). Point --data-dir at that folder."
        )
    classes, train_items = _list_train(train_dir)
    images, annotations = val_dir / "images", val_dir / "val_annotations.txt"
    index = {c: i for i, c in enumerate(classes)}
    if images.is_dir() and any(p.is_dir() for p in images.iterdir()):
        val_classes, test_items = _list_images(images)
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise DataError(f"{images} has class folders that train/ lacks: {', '.join(unknown[:5])}.")
        test_items = [(f, index[val_classes[label]]) for f, label in test_items]
    elif annotations.is_file():
        test_items = []
        for n, line in enumerate(annotations.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            parts = line.split("\t")
            if not line.strip():
                continue
            if len(parts) < 2 or parts[1] not in index:
                raise DataError(
                    f"{annotations}, line {n}: expected '<file>\\t<wnid>' with a wnid from train/, got {line[:80]!r}."
                )
            test_items.append((images / parts[0], index[parts[1]]))
        missing = [f for f, _ in test_items if not f.is_file()]
        if missing:
            raise DataError(
                f"{annotations} names {len(missing)} image(s) missing from {images}, e.g. {missing[0].name}."
            )
    else:
        raise DataError(
            f"{val_dir} holds neither val_annotations.txt nor class folders under images/: "
            "unpack the tiny-imagenet-200 archive as published."
        )
    return classes, train_items, test_items


def _list_train(train_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """``_list_images`` of the training split, which must hold at least two classes with images."""
    classes, train_items = _list_images(train_dir)
    if not classes or not train_items:
        raise DataError(
            f"{train_dir} holds no class folders with images: expected train/<class>/<images> ({', '.join(sorted(_IMAGE_SUFFIXES))})."
        )
    if len(classes) < 2:
        raise DataError(
            f"{train_dir} has only one class folder ({classes[0]!r}); classification needs at least 2. "
            "Put each class's images in its own folder under train/ and test/."
        )
    return classes, train_items


def _decoded_folder(name: str, root: Path, classes: list[str], train_items, test_items) -> Dataset:
    """Decode listed image files into a Dataset, through a cache keyed by the files' names, sizes and times.

    The (mean, std) pair is ``NORMALIZATION``'s, or for a dataset it does not list, the training images'.
    """
    stats = NORMALIZATION.get(name)
    listing = hashlib.sha256(name.encode())
    for f, label in train_items + test_items:
        st = f.stat()
        listing.update(f"{f.relative_to(root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = paths.cache_root() / f"{name}-{listing.hexdigest()[:20]}.safetensors"
    if cache.is_file():
        try:
            t, _ = storage.load_tensors(cache, "dpd.imagecache")
            splits = {k: t[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
            return Dataset(name, classes, **splits, mean=tuple(t["mean"].tolist()), std=tuple(t["std"].tolist()))
        except Exception:  # a broken cache is rebuilt, never trusted
            cache.unlink(missing_ok=True)
    try:
        with Image.open(train_items[0][0]) as im:
            mode = "L" if im.mode in ("L", "1", "I;16") else "RGB"
            size = im.size
        tr_x, te_x = _decode(train_items, mode, size), _decode(test_items, mode, size)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"Could not decode an image under {root}: {e}. Remove or fix that file.") from e
    tr_y, te_y = (torch.tensor([label for _, label in items]) for items in (train_items, test_items))
    splits = dict(train_images=tr_x, train_labels=tr_y, test_images=te_x, test_labels=te_y)
    if stats is None:
        pixels = tr_x.double() / 255
        stats = tuple(pixels.mean(dim=(0, 2, 3)).tolist()), tuple(pixels.std(dim=(0, 2, 3)).tolist())
    mean, std = stats
    stored = {**splits, "mean": torch.tensor(mean), "std": torch.tensor(std)}
    # The cache is an optimisation; an unwritable cache folder must not stop the run.
    with contextlib.suppress(Exception):
        storage.save_tensors(cache, stored, "dpd.imagecache", {"source": str(root.resolve()), "classes": classes})
    return Dataset(name, classes, **splits, mean=mean, std=std)


#: The datasets read from image files: name -> (what lists their classes and each split's (file, label) pairs,
#: what ``--data-dir`` must be).
_FOLDERS = {
    "imagefolder": (_imagefolder, " with train/<class>/ and test/<class>/ folders"),
    "tiny-imagenet": (_tiny_imagenet, ": the unpacked tiny-imagenet-200 folder (train/, val/)"),
}

#: The validation split depends on the dataset and its size only (not on --seed), so that experts,
#: distillation and evaluation, whatever their seeds, agree on which images it holds.
_VAL_SEED = int.from_bytes(hashlib.sha256(b"dpd validation split").digest()[:8], "little") & ((1 << 63) - 1)


def class_balanced(labels: torch.Tensor, n_classes: int, per_class: int, g: torch.Generator) -> list[torch.Tensor]:
    """For each class in turn, ``per_class`` indices of its images in a random order drawn from ``g``.

    Every seeded, class-balanced choice dpd makes (validation split, ``--train-per-class``, the random
    baseline) draws through here, so the same generator state gives the same images.
    """
    picks = []
    for c in range(n_classes):
        idx = torch.nonzero(labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return picks


def _holdout(ds: Dataset, per_class: int) -> Dataset:
    """Take a seeded, class-balanced validation split of ``per_class`` images per class out of the training set."""
    counts = ds.class_counts()
    if min(counts) <= per_class:
        c = counts.index(min(counts))
        raise DataError(
            f"--val-per-class {per_class} would leave no training image of class {ds.classes[c]!r}, which has "
            f"{min(counts)}. Use at most {min(counts) - 1} (a few percent of a class is usual)."
        )
    g = torch.Generator().manual_seed(_VAL_SEED)
    val = torch.cat(class_balanced(ds.train_labels, ds.n_classes, per_class, g)).sort().values
    rest = torch.ones(len(ds.train_labels), dtype=torch.bool)
    rest[val] = False
    return replace(
        ds,
        train_images=ds.train_images[rest],
        train_labels=ds.train_labels[rest],
        val_images=ds.train_images[val],
        val_labels=ds.train_labels[val],
        val_indices=val,
    )


def _per_class_subset(ds: Dataset, per_class: int, seed: int) -> Dataset:
    counts = ds.class_counts()
    if min(counts) < per_class:
        raise DataError(
            f"--train-per-class {per_class} is more than the smallest class of {ds.name} holds ({min(counts)}). "
            f"Use at most {min(counts)}."
        )
    g = torch.Generator().manual_seed(seed)
    keep = torch.cat(class_balanced(ds.train_labels, ds.n_classes, per_class, g)).sort().values
    return replace(ds, train_images=ds.train_images[keep], train_labels=ds.train_labels[keep])


def load_dataset(
    name: str,
    data_dir: Path | None = None,
    train_per_class: int | None = None,
    seed: int = 0,
    val_per_class: int | None = None,
) -> Dataset:
    """Load a dataset from the registry (``data_dir``: its files; ``None`` uses the cache and downloads).

    ``val_per_class`` training images per class are held out as a validation split (class-balanced, the
    same for a dataset whatever the seed); ``train_per_class`` then keeps that many of the rest per class
    (seeded by ``seed``).
    """
    if data_dir is not None and not Path(data_dir).exists():
        raise DataError(f"--data-dir {data_dir} does not exist. Point it at the folder holding the {name} files.")
    if name == "fashion-mnist-mini":
        ds = _load_idx_dataset(name, MINI_DIR, FASHION_CLASSES)
    elif name in _FOLDERS:
        list_files, needs = _FOLDERS[name]
        if data_dir is None:
            raise DataError(f"Dataset {name} needs --data-dir{needs}.")
        ds = _decoded_folder(name, Path(data_dir), *list_files(Path(data_dir)))
    else:
        ds = _torchvision(name, data_dir)
    if val_per_class is not None:
        ds = _holdout(ds, val_per_class)
    if train_per_class is not None:
        ds = _per_class_subset(ds, train_per_class, seed)
    return ds
