"""Shared test helpers."""

from __future__ import annotations

import torch

__all__ = ["assert_close", "tiny_spec"]


def assert_close(actual, expected, *, rtol: float | None = None, atol: float | None = None, **kwargs) -> None:
    """``torch.testing.assert_close`` that accepts plain numbers/lists and either tolerance alone."""
    if rtol is not None and atol is None:
        atol = 0.0
    if atol is not None and rtol is None:
        rtol = 0.0
    actual = actual if isinstance(actual, torch.Tensor) else torch.as_tensor(actual)
    expected = expected if isinstance(expected, torch.Tensor) else torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, **kwargs)


def tiny_spec(channels: int = 1, side: int = 8, n_classes: int = 3, width: int = 4, depth: int = 2):
    """The ConvNet spec of STYLE.md section 7: a couple of layers on tiny images."""
    from dpd_cli.models import ModelSpec

    return ModelSpec("convnet", channels, (side, side), n_classes, width=width, depth=depth)
