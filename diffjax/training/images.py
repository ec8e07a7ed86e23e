"""Sample grids as PNG files."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from diffjax.io import atomic_write

__all__ = ["to_uint8", "image_grid", "save_image_grid"]


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] (NHWC) to uint8 [0, 255], clipping out-of-range values."""
    images = np.asarray(images, np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images, columns: int | None = None, padding: int = 1) -> np.ndarray:
    """Tile NHWC uint8 images into one (rows*H, columns*W, C) image with `padding` pixels between."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {images.shape}")
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + padding) + padding, columns * (w + padding) + padding, c), images.dtype)
    for i in range(n):
        r, col = divmod(i, columns)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_image_grid(images, path: str, columns: int | None = None, upscale: int = 1) -> str:
    """Save images in [-1, 1] as one PNG grid, written atomically (temporary file, then rename)."""
    grid = image_grid(to_uint8(images), columns)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    return atomic_write(path, lambda f: picture.save(f, format="PNG"))
