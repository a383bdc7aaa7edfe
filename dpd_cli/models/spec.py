"""What a network is, as plain data: ``ModelSpec`` (stored as JSON in every file dpd writes), the
ConvNet's default depth, and the check of a file's ``model`` entry. Imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from dpd_cli.errors import StorageError

__all__ = ["MODEL_NAMES", "ModelSpec", "default_depth", "spec_from_meta"]

#: Every network dpd can build (``dpd_cli.models.MODELS`` maps each to its class).
MODEL_NAMES: tuple[str, ...] = ("convnet", "resnet18", "vgg11", "alexnet")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network; stored as JSON in every file."""

    name: str
    channels: int
    image_size: tuple[int, int]
    n_classes: int
    width: int = 128
    depth: int = 3
    norm: str = "instance"
    pool: str = "avg"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        d = dict(d)
        d["image_size"] = tuple(d["image_size"])
        return cls(**d)

    def tag(self) -> str:
        """Folder-friendly name, e.g. ``convnet-w128-d3-instance-avg``."""
        if self.name == "convnet":
            return f"convnet-w{self.width}-d{self.depth}-{self.norm}-{self.pool}"
        return f"{self.name}-{self.norm}"


def default_depth(image_size: tuple[int, int]) -> int:
    """ConvNet depth from resolution: 3 for 28-32 px, 4 for 64 px (MTT), within [1, 5]."""
    side = min(image_size)
    if side == 28:
        side = 32  # the first conv pads 28 px grayscale images to 32 px
    return max(1, min(5, round(math.log2(side)) - 2))


def spec_from_meta(path: Path, value) -> ModelSpec:
    """The ``model`` metadata entry of a dpd file as a ModelSpec, checked field by field.

    Raises:
        StorageError: The entry is missing or malformed (the file is damaged or foreign).
    """

    def pos_int(v) -> bool:
        return type(v) is int and 1 <= v <= 1 << 20

    ok = (
        isinstance(value, dict)
        and set(value) == {"name", "channels", "image_size", "n_classes", "width", "depth", "norm", "pool"}
        and value["name"] in MODEL_NAMES
        and all(pos_int(value[k]) for k in ("channels", "n_classes", "width", "depth"))
        and isinstance(value["image_size"], list)
        and len(value["image_size"]) == 2
        and all(pos_int(v) for v in value["image_size"])
        and value["norm"] in ("instance", "batch", "none")
        and value["pool"] in ("avg", "max")
    )
    if not ok:
        raise StorageError(
            f"{path}: the metadata entry 'model' is missing or malformed ({str(value)[:200]}); the file is damaged or was not written by dpd."
        )
    return ModelSpec.from_dict(value)
