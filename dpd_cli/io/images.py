"""Image grids as PNG (rows = classes), written atomically."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from dpd_cli.io.storage import atomic_write

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PER_CLASS, _SCALE, _PAD = 10, 2, 2  # images per row, upscaling, pixels between images


def save_grid(images01: torch.Tensor, labels: torch.Tensor, n_classes: int, path: Path) -> Path:
    """Save pixels in [0, 1] ``(n, C, H, W)`` as a grid, one row per class (at most 10 images), upscaled 2x."""
    images01 = images01.detach().float().cpu().clamp(0, 1)
    rows = [images01[labels.cpu() == c][:_PER_CLASS] for c in range(n_classes)]
    ch, h, w = images01.shape[1:]
    canvas = torch.ones(ch, len(rows) * (h + _PAD) + _PAD, max(map(len, rows), default=0) * (w + _PAD) + _PAD)
    for r, sel in enumerate(rows):
        for k, img in enumerate(sel):
            y, x = _PAD + r * (h + _PAD), _PAD + k * (w + _PAD)
            canvas[:, y : y + h, x : x + w] = img
    arr = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    im = Image.fromarray(arr[:, :, 0] if ch == 1 else arr, mode="L" if ch == 1 else "RGB")
    im = im.resize((im.width * _SCALE, im.height * _SCALE), Image.NEAREST)
    with atomic_write(Path(path)) as f:
        im.save(f, format="PNG")
    return Path(path)


def check_png(path: Path) -> str | None:
    """Why ``path`` is not a PNG image (``None`` when it starts like one)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"{Path(path).name} cannot be read ({e.strerror or e})."
    return None if head == _PNG_MAGIC else f"{Path(path).name} is not a PNG image (truncated or overwritten)."
