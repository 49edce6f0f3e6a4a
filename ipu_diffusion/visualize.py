"""Image grids: write a batch of images as one PNG.

    save_image_grid(samples, "runs/digits/samples.png")   # samples [N, H, W, C] in [-1, 1]

The grid has ``ncols`` columns (default: ``ceil(sqrt(N))``) and ``ceil(N / ncols)``
rows of tiles separated and framed by ``padding`` pixels of ``pad_value``; each tile
is upscaled ``scale`` times (nearest neighbour). Output size, for ``scale`` 1:
``rows * H + (rows + 1) * padding`` by ``ncols * W + (ncols + 1) * padding``.
Grey images (C = 1) give a grey PNG, RGB ones an RGB PNG.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np


def to_uint8(images) -> np.ndarray:
    """float ``[..]`` in [-1, 1] -> uint8 in [0, 255] (clipped, rounded)."""
    x = np.asarray(images, np.float32)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, ncols: Optional[int] = None, padding: int = 2, pad_value: int = 255,
              scale: int = 1) -> np.ndarray:
    """Tile images float ``[N, H, W, C]`` in [-1, 1] (C = 1 or 3) into one uint8 array
    ``[rows*H*scale + (rows+1)*padding, ncols*W*scale + (ncols+1)*padding, C]``."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]  # [N, H, W] grey
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty [N, H, W, C] array with C = 1 or 3, "
                         f"got shape {list(np.shape(images))}")
    if scale < 1 or padding < 0:
        raise ValueError(f"scale must be >= 1 and padding >= 0, got scale={scale}, "
                         f"padding={padding}")
    tiles = to_uint8(x)
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = tiles.shape
    ncols = int(ncols) if ncols else int(math.ceil(math.sqrt(n)))
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, n)
    rows = int(math.ceil(n / ncols))
    grid = np.full((rows * h + (rows + 1) * padding, ncols * w + (ncols + 1) * padding, c),
                   pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = tiles[i]
    return grid


def save_image_grid(images, path: str, ncols: Optional[int] = None, padding: int = 2,
                    scale: Optional[int] = None) -> str:
    """Write :func:`make_grid` of ``images`` ``[N, H, W, C]`` in [-1, 1] as a PNG at
    ``path`` (parent folders are created); returns ``path``. ``scale`` None picks the
    integer upscaling that makes small images (e.g. 16x16 digits) at least 64 px tall."""
    from PIL import Image

    if scale is None:
        scale = max(1, -(-64 // int(np.shape(images)[1])))
    grid = make_grid(images, ncols, padding, scale=scale)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path, format="PNG")
    return path
