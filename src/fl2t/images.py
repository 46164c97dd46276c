"""Small image utilities (PIL only): what the benchmark's reports and the world's checks show."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image


def image_grid(images: Sequence[Image.Image], columns: int, scale: int = 3, pad: int = 2) -> Image.Image:
    """Images side by side, scaled up with nearest-neighbour so pixels stay visible."""
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
