"""Networks: the ConvNet family, ResNet-18 / VGG-11 / AlexNet, and the flat-parameter view.

``MODELS`` is the one registry of networks: a name maps to the class that builds it, written as
``"module:Class"`` and imported only when a network is built. So the names (for settings, help
and validation) are known without importing torch, and a new network is one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from dpd_cli.models.spec import MODEL_NAMES, ModelSpec, default_depth

__all__ = ["MODELS", "MODEL_NAMES", "FlatModel", "ModelSpec", "build_model", "default_depth", "model_class"]

#: Every network dpd can build: name -> ``"module:Class"`` (the class takes a ``ModelSpec``).
MODELS: dict[str, str] = {
    "convnet": "dpd_cli.models.nets:ConvNet",
    "resnet18": "dpd_cli.models.nets:ResNet18",
    "vgg11": "dpd_cli.models.nets:VGG11",
    "alexnet": "dpd_cli.models.nets:AlexNet",
}
assert tuple(MODELS) == MODEL_NAMES

# Public names that need torch, imported on first use (PEP 562) so `dpd --help` stays instant.
_LAZY = {"FlatModel": "dpd_cli.models.flat", "build_model": "dpd_cli.models.nets"}


def model_class(name: str) -> type:
    """The class registered as ``name`` in ``MODELS`` (imports its module)."""
    module, _, attr = MODELS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
