"""Image grids as PNG (rows = classes), written atomically."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from dpd_cli.io.storage import atomic_write

__all__ = ["save_grid", "check_png"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def save_grid(
    images01: torch.Tensor, labels: torch.Tensor, n_classes: int, path: Path, max_per_class: int = 10, scale: int = 2
) -> Path:
    """Save pixels in [0, 1] ``(n, C, H, W)`` as a grid, one row per class, upscaled ``scale`` x.

    Returns:
        The path written.
    """
    images01 = images01.detach().float().cpu().clamp(0, 1)
    rows = []
    per_class = 0
    for c in range(n_classes):
        sel = images01[labels.cpu() == c][:max_per_class]
        rows.append(sel)
        per_class = max(per_class, len(sel))
    n, ch, h, w = len(rows), images01.shape[1], images01.shape[2], images01.shape[3]
    pad = 2
    canvas = torch.ones(ch, n * (h + pad) + pad, per_class * (w + pad) + pad)
    for r, sel in enumerate(rows):
        for k, img in enumerate(sel):
            y, x = pad + r * (h + pad), pad + k * (w + pad)
            canvas[:, y : y + h, x : x + w] = img
    arr = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    im = Image.fromarray(arr[:, :, 0] if ch == 1 else arr, mode="L" if ch == 1 else "RGB")
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    with atomic_write(Path(path)) as f:
        im.save(f, format="PNG")
    return Path(path)


def check_png(path: Path) -> str | None:
    """Why ``path`` is not a PNG image (``None`` when it starts like one)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"{path.name} cannot be read ({e.strerror or e})."
    return None if head == _PNG_MAGIC else f"{path.name} is not a PNG image (truncated or overwritten)."
