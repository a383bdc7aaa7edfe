"""Build the embedded ``fashion-mnist-mini`` dataset shipped inside the package.

A class-balanced, seeded subset of Fashion-MNIST: 500 training and 100 test images per
class, written in the original IDX format (gzip) so the same reader serves both the
full dataset and the mini one.

    python scripts/make_mini_dataset.py ../shared/data/fashion-mnist dpd_cli/data/mini

Selection: for each class, the first ``n`` indices of a ``numpy.random.default_rng(0)``
permutation of that class's images, kept in their original order.
"""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np

N_TRAIN_PER_CLASS = 500
N_TEST_PER_CLASS = 100


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    # mtime=0 makes the archive byte-for-byte reproducible.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        keep.append(np.sort(rng.permutation(idx)[:per_class]))
    return np.sort(np.concatenate(keep))


def main(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", N_TRAIN_PER_CLASS), ("t10k", N_TEST_PER_CLASS)):
        images = read_idx(src / f"{split}-images-idx3-ubyte.gz")
        labels = read_idx(src / f"{split}-labels-idx1-ubyte.gz")
        keep = balanced_subset(labels, per_class, seed=0)
        write_idx(dst / f"{split}-images-idx3-ubyte.gz", images[keep])
        write_idx(dst / f"{split}-labels-idx1-ubyte.gz", labels[keep])
        print(f"{split}: {len(keep)} images, per class {np.bincount(labels[keep]).tolist()}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
