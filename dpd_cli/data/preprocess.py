"""From uint8 pixels to the "training space" the networks see, and back.

As MTT builds it (docs/algorithm.md): ``x = ZCA((pixels / 255 - mean) / std)``, with ZCA the identity
when absent. With ZCA, ``mean`` 0 and ``std`` 1 (no normalisation) and the whitening (eps 0.1, kornia's
``ZCAWhitening``, as MTT) is fitted on the raw [0, 1] training pixels. The test set must see the same
transform, so it is stored with every expert and synthetic set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

ZCA_EPS = 0.1
#: Version of the recipe above. 1 (dpd 0.1) fitted ZCA on *normalised* pixels and normalised
#: CIFAR-100 with its own statistics; 2 is MTT's preprocessing. Experts folders record it.
PREPROCESS_SCHEME = 2


@dataclass
class Preprocess:
    """Normalisation (+ optional ZCA) as tensors; applies to images ``(N, C, H, W)``."""

    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)
    zca_mean: torch.Tensor | None = None  # (D,) with D = C*H*W
    zca_matrix: torch.Tensor | None = None  # (D, D), symmetric
    zca_inverse: torch.Tensor | None = None  # (D, D)

    @property
    def has_zca(self) -> bool:
        return self.zca_matrix is not None

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.float() / 255.0
        return (x - self.mean.to(x.device).view(1, -1, 1, 1)) / self.std.to(x.device).view(1, -1, 1, 1)

    def apply(self, images_uint8: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        """uint8 ``(N, C, H, W)`` -> float32 training space, in chunks to bound memory."""
        out = []
        for i in range(0, len(images_uint8), batch):
            x = self.normalize(images_uint8[i : i + batch])
            if self.has_zca:
                flat = x.flatten(1) - self.zca_mean.to(x.device)
                x = (flat @ self.zca_matrix.to(x.device)).view_as(x)
            out.append(x)
        return torch.cat(out) if out else self.normalize(images_uint8)

    def invert(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Training space -> pixels in [0, 1] (ZCA undone, then de-normalised, clamped unless ``clamp`` is False)."""
        x = x.detach().float()
        if self.has_zca:
            flat = x.flatten(1) @ self.zca_inverse.to(x.device) + self.zca_mean.to(x.device)
            x = flat.view_as(x)
        x = x * self.std.to(x.device).view(1, -1, 1, 1) + self.mean.to(x.device).view(1, -1, 1, 1)
        return x.clamp(0, 1) if clamp else x

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"norm_mean": self.mean, "norm_std": self.std}
        if self.has_zca:
            out.update(zca_mean=self.zca_mean, zca_matrix=self.zca_matrix, zca_inverse=self.zca_inverse)
        return {k: v.detach().cpu().float().contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Preprocess:
        return cls(t["norm_mean"], t["norm_std"], t.get("zca_mean"), t.get("zca_matrix"), t.get("zca_inverse"))

    def fingerprint(self) -> str:
        """Short hash identifying the transform (equal transforms give equal fingerprints)."""
        h = hashlib.sha256()
        for t in self.tensors().values():
            h.update(t.numpy().round(5).tobytes())
        return h.hexdigest()[:16]


def fit_zca(x: torch.Tensor, eps: float = ZCA_EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean (D,), W (D, D), W^-1 (D, D))`` float32 of ZCA whitening fitted on images ``(N, C, H, W)``.

    ``W = U diag(1/sqrt(S + eps)) U^T`` from ``cov = U diag(S) U^T``, the (N-1)-normalised covariance of
    the flattened images, in float64 (kornia's ZCAWhitening, which MTT uses).
    """
    flat = x.flatten(1).double()
    mean = flat.mean(0)
    centred = flat - mean
    s, u = torch.linalg.eigh(centred.T @ centred / max(1, flat.shape[0] - 1))
    s = s.clamp_min(0)
    w = (u * (s + eps).rsqrt()) @ u.T
    w_inv = (u * (s + eps).sqrt()) @ u.T
    return mean.float(), w.float(), w_inv.float()
