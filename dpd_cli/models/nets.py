"""Network definitions, sized from the image shape (28-64 px) and built from a plain spec.

The ConvNet follows MTT/DC: ``depth`` x [conv3x3(width) -> norm -> ReLU -> pool 2x2], then a
linear classifier. "instance" norm is ``GroupNorm(width, width)`` (affine), as in MTT. The module,
which experts and evaluation train and nothing differentiates twice, is plain ``torch.nn``
(``nn.Conv2d``, ``nn.GroupNorm``, ``nn.ReLU``, ``nn.AvgPool2d``). The distillation student
(``forward_flat``) computes the same function with dpd's twice-differentiable ``conv.conv2d``,
``norm.instance_norm`` (the ReLU folded in) and ``norm.avg_pool2``: the same forward kernels, a small
double-backward graph. Grayscale 28 px inputs get padding 3 in the first conv so they are handled
like 32 px.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpd_cli.models import model_class
from dpd_cli.models.conv import conv2d
from dpd_cli.models.norm import InstanceNorm, avg_pool2, instance_norm
from dpd_cli.models.spec import ModelSpec

__all__ = ["build_model", "ConvNet"]


def _norm(kind: str, c: int, twice: bool = True) -> nn.Module:
    """The norm layer ``kind`` over ``c`` channels. With ``twice`` (ResNet-18 and VGG-11 are their own students,
    differentiated twice through ``functional_call``) instance norm is ``norm.InstanceNorm``, else ``nn.GroupNorm``:
    an ``nn.GroupNorm(c, c)`` either way, with the same parameters, state dict and numbers."""
    if kind == "instance":
        return InstanceNorm(c) if twice else nn.GroupNorm(c, c)
    return nn.BatchNorm2d(c) if kind == "batch" else nn.Identity()


class ConvNet(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        c, (h, w) = spec.channels, spec.image_size
        self._pads: list[int] = []
        self._norm_kind, self._pool_kind = spec.norm, spec.pool
        # Batch norm keeps running statistics in buffers: leave it to functional_call.
        self.supports_forward_flat = spec.norm != "batch"
        for d in range(spec.depth):
            pad = 3 if (d == 0 and spec.channels == 1 and spec.image_size == (28, 28)) else 1
            self.add_module(f"conv{d + 1}", nn.Conv2d(c, spec.width, 3, padding=pad))
            # The student runs forward_flat (or, with batch norm, functional_call: PyTorch differentiates
            # BatchNorm2d twice itself), so the module is plain torch.nn.
            self.add_module(f"norm{d + 1}", _norm(spec.norm, spec.width, twice=False))
            self.add_module(f"act{d + 1}", nn.ReLU(inplace=True))
            self.add_module(f"pool{d + 1}", nn.AvgPool2d(2, 2) if spec.pool == "avg" else nn.MaxPool2d(2, 2))
            self._pads.append(pad)
            h, w = (h + 2 * pad - 2) // 2, (w + 2 * pad - 2) // 2
            c = spec.width
        if h < 1 or w < 1:
            raise ValueError(f"ConvNet depth {spec.depth} is too deep for {spec.image_size} images")
        self.depth = spec.depth
        self.fc = nn.Linear(c * h * w, spec.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for d in range(1, self.depth + 1):
            for part in ("conv", "norm", "act", "pool"):
                x = getattr(self, f"{part}{d}")(x)
        return self.fc(x.flatten(1))

    def forward_flat(self, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``forward`` with parameters from ``p`` (name -> tensor), in plain functional ops.

        The distillation student runs this N times per iteration; it computes exactly what
        ``functional_call(self, p, x)`` does without that call's per-call module swapping,
        which dominates on a GPU at small batch sizes.

        K students at once (``dpd distill --seeds``): ``x`` is ``(K, n, C, H, W)`` and every tensor of ``p``
        has a leading member axis K; the result is ``(K, n, classes)``. They run as one network K times as
        wide: member k's channels are the k-th block, its convolutions a group of their own, and instance
        norm, ReLU and pooling act per channel anyway.
        """
        k = x.shape[0] if x.dim() == 5 else 1
        wide = (lambda t: t.flatten(0, 1)) if x.dim() == 5 else (lambda t: t)
        if x.dim() == 5:
            x = x.transpose(0, 1).flatten(1, 2)  # (n, K*C, H, W)
        for d in range(1, self.depth + 1):
            x = conv2d(x, wide(p[f"conv{d}.weight"]), wide(p[f"conv{d}.bias"]), padding=self._pads[d - 1], groups=k)
            if self._norm_kind == "instance":
                x = instance_norm(x, wide(p[f"norm{d}.weight"]), wide(p[f"norm{d}.bias"]), eps=1e-5, relu=True)
            else:
                x = F.relu(x)
            x = avg_pool2(x) if self._pool_kind == "avg" else F.max_pool2d(x, 2, 2)
        if p["fc.weight"].dim() == 2:
            return F.linear(x.flatten(1), p["fc.weight"], p["fc.bias"])
        x = x.reshape(x.shape[0], k, -1).transpose(0, 1)  # (K, n, features): member k's in its own order
        return torch.baddbmm(p["fc.bias"].unsqueeze(1), x, p["fc.weight"].transpose(1, 2))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images (3x3 stem, no max-pool), as in the DC/MTT benchmarks."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.conv1 = nn.Conv2d(spec.channels, 64, 3, 1, 1, bias=False)
        self.bn1 = _norm(spec.norm, 64)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
            blocks.append(_BasicBlock(cin, cout, stride, spec.norm))
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, spec.n_classes)

    def forward(self, x):
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class VGG11(nn.Module):
    """VGG-11 with the chosen norm; pools are skipped once the feature map is 1 px."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        layers, c, side = [], spec.channels, min(spec.image_size)
        # Grayscale 28 px is padded to 32 px by the first conv (as in DC/MTT): at 28 px the last two
        # convs would see 1x1 maps, where instance norm outputs a constant whatever the input.
        pad = 3 if (spec.channels == 1 and spec.image_size == (28, 28)) else 1
        side += 2 * (pad - 1)
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
            if v == "M":
                if side >= 2:
                    layers.append(nn.MaxPool2d(2, 2))
                    side //= 2
            else:
                layers += [nn.Conv2d(c, v, 3, padding=pad), _norm(spec.norm, v), nn.ReLU(inplace=True)]
                c, pad = v, 1
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(512, spec.n_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


#: AlexNet's convolutions: (out channels, kernel, followed by a 2x2 max-pool).
_ALEXNET = ((128, 5, True), (192, 5, True), (256, 3, False), (192, 3, False), (192, 3, True))


class AlexNet(nn.Module):
    """The small-image AlexNet of the DC benchmark (no norm layers)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        layers, c = [], spec.channels
        for i, (cout, kernel, pool) in enumerate(_ALEXNET):
            pad = kernel // 2 if i > 0 else (4 if spec.channels == 1 else 2)  # grayscale 28 px is padded to 32 px
            layers += [nn.Conv2d(c, cout, kernel, 1, pad), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2, 2))
            c = cout
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            n = self.features(torch.zeros(1, spec.channels, *spec.image_size)).numel()
        self.fc = nn.Linear(n, spec.n_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the network for ``spec`` with PyTorch's default initialisation (seed beforehand).

    The name is looked up in ``dpd_cli.models.MODELS``, the one registry of networks.
    """
    return model_class(spec.name)(spec)
