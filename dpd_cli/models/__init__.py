"""Networks: the ConvNet family, ResNet-18 / VGG-11 / AlexNet, and the flat-parameter view."""

from dpd_cli.models.flat import FlatModel
from dpd_cli.models.nets import ModelSpec, build_model, default_depth

__all__ = ["FlatModel", "ModelSpec", "build_model", "default_depth"]
