"""save_image_grid writes a PNG of the documented size and content."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ipu_diffusion.visualize import make_grid, save_image_grid


def test_grey_grid_png_has_the_right_size_and_pixels(tmp_path):
    images = np.linspace(-1, 1, 10)[:, None, None, None] * np.ones((10, 8, 6, 1))
    path = save_image_grid(images, str(tmp_path / "sub" / "grid.png"), ncols=4, scale=1)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "L"
        # 3 rows x 4 columns of 8x6 tiles with 2-pixel padding around and between.
        assert img.size == (4 * 6 + 5 * 2, 3 * 8 + 4 * 2)
        pixels = np.asarray(img)
    assert pixels[2, 2] == 0 and pixels[0, 0] == 255  # first tile is -1 -> 0; padding white
    assert pixels[2 + 2 * 10, 2 + 1 * 8] == 255  # tile 9 (row 2, col 1) is +1 -> 255


def test_rgb_grid_default_columns_and_scale(tmp_path):
    images = np.random.RandomState(0).uniform(-1, 1, (5, 4, 4, 3))
    path = save_image_grid(images, str(tmp_path / "rgb.png"), scale=3, padding=1)
    with Image.open(path) as img:
        assert img.mode == "RGB"
        assert img.size == (3 * 12 + 4, 2 * 12 + 3)  # ceil(sqrt(5)) = 3 columns, 2 rows
    grid = make_grid(images, padding=0)
    np.testing.assert_array_equal(grid[:4, :4], np.rint((images[0] + 1) * 127.5).astype(np.uint8))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        make_grid(np.zeros((2, 4, 4, 2)))


def test_small_images_are_upscaled_by_default(tmp_path):
    from PIL import Image

    path = save_image_grid(np.zeros((4, 16, 16, 1), np.float32), str(tmp_path / "g.png"),
                           ncols=2, padding=0)
    assert Image.open(path).size == (2 * 64, 2 * 64)  # 16 px tiles upscaled 4x
