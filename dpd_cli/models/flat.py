"""A flat-parameter functional view of a module.

Trajectories store parameters as one flat vector of P numbers; the distillation student is a
flat vector too. ``FlatModel`` knows the layout (names, shapes, offsets) and runs the module
from any flat vector through ``torch.func.functional_call`` -- the vector's autograd history
flows through, which the unrolled meta-gradient needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["FlatModel", "Layer"]


@dataclass(frozen=True)
class Layer:
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


class FlatModel:
    """Flat view of ``module``'s parameters.

    Example:
        >>> fm = FlatModel(net)
        >>> theta = fm.flatten()            # (P,) copy of the current parameters
        >>> logits = fm(theta, images)      # same as net(images) when theta is unchanged
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.layers: list[Layer] = []
        self.n_params = 0
        for name, p in module.named_parameters():
            self.layers.append(Layer(name, tuple(p.shape), self.n_params, p.numel()))
            self.n_params += p.numel()
        self._numels = [layer.numel for layer in self.layers]

    @property
    def layout(self) -> list[list]:
        """``[[name, shape], ...]``: stored with every trajectory, compared on load."""
        return [[layer.name, list(layer.shape)] for layer in self.layers]

    def layer_ids(self, device=None) -> torch.Tensor:
        """``(P,)`` int64: the index of the layer each flat entry belongs to."""
        return torch.repeat_interleave(
            torch.arange(len(self.layers), device=device), torch.tensor(self._numels, device=device)
        )

    def flatten(self) -> torch.Tensor:
        """A detached copy of the module's current parameters as one flat vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()]).clone()

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Name -> parameter views of ``flat`` ``(P,)``, or ``(K, P)`` (then each with a leading member axis K)."""
        chunks = torch.split(flat, self._numels, dim=-1)
        return {
            layer.name: c.reshape(*flat.shape[:-1], *layer.shape) for layer, c in zip(self.layers, chunks, strict=True)
        }

    def load_(self, flat: torch.Tensor) -> None:
        """Copy a flat vector into the module's parameters in place."""
        with torch.no_grad():
            for p, v in zip(self.module.parameters(), self.unflatten(flat).values(), strict=True):
                p.copy_(v)

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The logits at ``flat`` ``(P,)`` on ``x``; or K members' at once: ``flat`` ``(K, P)``, ``x`` ``(K, n, ...)``,
        logits ``(K, n, classes)``, member k the network at ``flat[k]`` on ``x[k]``."""
        if getattr(self.module, "supports_forward_flat", False):
            return self.module.forward_flat(self.unflatten(flat), x)  # same math, no per-call module swapping
        if flat.dim() == 2:
            return torch.stack([self(f, xk) for f, xk in zip(flat, x, strict=True)])
        return functional_call(self.module, self.unflatten(flat), (x,))
