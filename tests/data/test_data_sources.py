"""Data sources: digits split, image folders (with broken files), .npz, TFDS errors."""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from ipu_diffusion.config import config_from_dict
from ipu_diffusion.data import DataError, load_arrays
from ipu_diffusion.data import digits as digits_mod


def cfg(size=16, channels=1, **data):
    return config_from_dict({"model": {"image_size": size, "in_channels": channels},
                             "data": data})


# --------------------------------------------------------------------------- digits


def test_digits_split_shapes_range_and_stratification():
    x, y = load_arrays(cfg(), "train")
    xt, yt = load_arrays(cfg(), "test")
    # 1,797 images; test_fraction 0.2 -> ceil(0.2 * 1797) = 360 held out (sklearn rounds up).
    assert x.shape == (1437, 16, 16, 1) and xt.shape == (360, 16, 16, 1)
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.min() == -1.0 and x.max() == 1.0 and xt.min() >= -1.0 and xt.max() <= 1.0
    # Stratified: every class has 10 % of the test split, up to rounding.
    assert np.all(np.abs(np.bincount(yt, minlength=10) - 36) <= 1)


def test_digits_are_deterministic_and_native_size_is_exact():
    digits_mod._CACHE.clear()
    a, ya = load_arrays(cfg(), "test")
    digits_mod._CACHE.clear()
    b, yb = load_arrays(cfg(), "test")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ya, yb)
    from sklearn.datasets import load_digits

    raw = load_digits()
    x8, y8 = load_arrays(cfg(size=8), "train")
    train_idx, _ = digits_mod._split_indices(raw.target, 0.2)
    np.testing.assert_allclose(x8[..., 0], raw.images[train_idx] / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(y8, raw.target[train_idx])


def test_digits_rgb_repeats_grey_and_no_test_split_is_an_error():
    rgb, _ = load_arrays(cfg(channels=3), "test")
    grey, _ = load_arrays(cfg(channels=1), "test")
    assert rgb.shape == (360, 16, 16, 3)
    np.testing.assert_array_equal(rgb, np.repeat(grey, 3, axis=-1))
    with pytest.raises(DataError, match="test_fraction"):
        load_arrays(cfg(test_fraction=0.0), "test")
    with pytest.raises(DataError, match="split 'valid'"):
        load_arrays(cfg(), "valid")


# --------------------------------------------------------------------------- folders


def _stripes(h, w):
    """RGB image: left quarter red, middle half green, right quarter blue."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 4, 0] = 255
    img[:, w // 4: 3 * w // 4, 1] = 255
    img[:, 3 * w // 4:, 2] = 255
    return img


@pytest.fixture()
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    for sub in ("cat", "dog", "dog/nested"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(_stripes(20, 40)).save(root / "cat" / "a.png")
    Image.fromarray(_stripes(32, 32)).save(root / "cat" / "b.jpg", quality=95)
    Image.fromarray(np.full((24, 40), 200, np.uint8), "L").save(root / "dog" / "c.png")
    Image.fromarray(_stripes(16, 16)).save(root / "dog" / "nested" / "d.jpeg")
    (root / "dog" / "broken.png").write_bytes(b"this is not an image at all")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    good = (root / "cat" / "a.png").read_bytes()
    (root / "cat" / "trunc.png").write_bytes(good[: len(good) // 2])
    jpg = (root / "cat" / "b.jpg").read_bytes()
    (root / "dog" / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(root / "dog" / "deep.png")  # I;16
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    return str(root)


def test_folder_reads_labels_crops_and_skips_bad_files_once(image_folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, y = load_arrays(cfg(size=8, channels=3, source="folder", path=image_folder))
    ours = [w for w in caught if "skipped" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    assert "skipped 5 unusable" in message and image_folder in message
    assert "2 truncated" in message and "1 unreadable" in message
    assert "1 zero bytes" in message and "1 unsupported pixel mode I;16" in message
    assert x.shape == (4, 8, 8, 3) and x.dtype == np.float32
    # Sorted paths: cat/a.png, cat/b.jpg, dog/c.png, dog/nested/d.jpeg; classes cat=0, dog=1.
    np.testing.assert_array_equal(y, [0, 0, 1, 1])
    # a.png is 20x40: shorter side 20 -> 8 gives 8x16, the centre 8 columns are green.
    np.testing.assert_allclose(x[0, :, 2:6], np.broadcast_to([-1.0, 1.0, -1.0], (8, 4, 3)),
                               atol=0.02)
    # The grey PNG became RGB with equal planes (200 -> 200/127.5 - 1).
    np.testing.assert_allclose(x[2], 200 / 127.5 - 1.0, atol=1e-6)


def test_folder_and_npz_are_decoded_once_until_a_file_changes(image_folder, tmp_path,
                                                             monkeypatch):
    """A run reads its data several times (banner, each fit call, evaluation): the
    decoded arrays are reused while every file keeps its size and modification time."""
    from ipu_diffusion.data import folder

    decoded = []
    read = folder.read_image
    monkeypatch.setattr(folder, "read_image", lambda path, *a: decoded.append(path) or read(path, *a))
    c = cfg(size=8, channels=3, source="folder", path=image_folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, _ = load_arrays(c)
        n = len(decoded)
        again, labels = load_arrays(c)
    assert n == 9 and len(decoded) == n  # 9 image files, decoded by the first load only
    assert len([w for w in caught if "skipped" in str(w.message)]) == 1
    np.testing.assert_array_equal(first, again)
    with pytest.raises(ValueError, match="read-only"):
        labels[0] = 5
    Image.fromarray(_stripes(8, 8)).save(os.path.join(image_folder, "cat", "new.png"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_arrays(c)[0].shape == (5, 8, 8, 3) and len(decoded) == 2 * n + 1
    path = str(tmp_path / "a.npz")
    np.savez(path, images=np.zeros((2, 8, 8, 3), np.uint8))
    c = cfg(size=8, channels=3, source="npz", path=path)
    assert load_arrays(c)[0].shape == (2, 8, 8, 3)
    np.savez(path, images=np.zeros((3, 8, 8, 3), np.uint8))  # another file there: read again
    assert load_arrays(c)[0].shape == (3, 8, 8, 3)


def test_folder_grey_versus_rgb(image_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grey, _ = load_arrays(cfg(size=8, channels=1, source="folder", path=image_folder))
        rgb, _ = load_arrays(cfg(size=8, channels=3, source="folder", path=image_folder))
    assert grey.shape == (4, 8, 8, 1) and rgb.shape == (4, 8, 8, 3)
    # BT.601 luma of pure green is 0.587 * 255 = 149.7 -> 150.
    np.testing.assert_allclose(grey[0, :, 3:5, 0], 150 / 127.5 - 1.0, atol=0.02)


def test_folder_without_subfolders_has_no_labels(tmp_path):
    Image.fromarray(_stripes(8, 8)).save(tmp_path / "x.png")
    x, y = load_arrays(cfg(size=8, channels=3, source="folder", path=str(tmp_path)))
    assert x.shape == (1, 8, 8, 3) and y is None
    with pytest.raises(DataError, match="use_labels"):
        load_arrays(config_from_dict({"model": {"image_size": 8, "num_classes": 2},
                                      "data": {"source": "folder", "path": str(tmp_path),
                                               "use_labels": True}}))


def test_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_arrays(cfg(source="folder", path=str(tmp_path)))
    with pytest.raises(DataError, match="not a directory"):
        load_arrays(cfg(source="folder", path=str(tmp_path / "missing")))
    (tmp_path / "bad.png").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="none of the 1 image files"):
            load_arrays(cfg(source="folder", path=str(tmp_path)))
    with pytest.raises(DataError, match="no held-out test split"):
        load_arrays(cfg(source="folder", path=str(tmp_path)), "test")


# --------------------------------------------------------------------------- npz


def test_npz_ok_with_labels_and_single_array(tmp_path):
    rs = np.random.RandomState(0)
    images = rs.randint(0, 256, (6, 12, 10, 3)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(6))
    x, y = load_arrays(cfg(size=8, channels=3, source="npz", path=str(tmp_path / "d.npz")))
    assert x.shape == (6, 8, 8, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(y, np.arange(6))
    np.savez(tmp_path / "one.npz", pixels=images[:, :10, :10, :1])
    x1, y1 = load_arrays(cfg(size=10, channels=1, source="npz", path=str(tmp_path / "one.npz")))
    np.testing.assert_allclose(x1, images[:, :10, :10, :1] / 127.5 - 1.0, atol=1e-6)
    assert y1 is None


@pytest.mark.parametrize("arrays, pattern", [
    ({"images": np.zeros((2, 8, 8, 3), np.float32)}, "must be uint8"),
    ({"images": np.zeros((2, 8, 8), np.uint8)}, "rank 4"),
    ({"images": np.zeros((2, 8, 8, 2), np.uint8)}, "1, 3 or 4 channels"),
    ({"a": np.zeros((2, 8, 8, 3), np.uint8), "b": np.zeros(2)}, "key 'images'"),
    ({"images": np.zeros((2, 8, 8, 3), np.uint8), "labels": np.zeros(3, np.int64)},
     r"shape \[2\]"),
])
def test_npz_bad_contents_are_clear_errors(tmp_path, arrays, pattern):
    path = str(tmp_path / "bad.npz")
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=pattern) as info:
        load_arrays(cfg(size=8, channels=3, source="npz", path=path))
    assert path in str(info.value)


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_arrays(cfg(source="npz", path=str(tmp_path / "nope.npz")))


# --------------------------------------------------------------------------- tfds


def test_tfds_missing_gives_offline_instructions(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    config = cfg(source="tfds", tfds_name="mnist", path=str(tmp_path))
    with pytest.raises(DataError) as info:
        load_arrays(config)
    text = str(info.value)
    assert "pip install tensorflow-datasets" in text
    assert f"tfds build mnist --data_dir {tmp_path}" in text
    with pytest.raises(DataError, match="tfds_name is empty"):
        load_arrays(cfg(source="tfds"))
    assert os.listdir(tmp_path) == []  # nothing fetched or written


@pytest.mark.parametrize("source, split", [("digits", "test"), ("tfds", "test"),
                                           ("folder", "train"), ("npz", "train")])
def test_held_out_split_is_the_test_split_where_the_source_has_one(source, split):
    """The digits hold out data.test_fraction, TFDS sets ship a "test" split; folders and
    .npz arrays have none, so evaluation compares against their training images."""
    from ipu_diffusion.data import held_out_split

    assert held_out_split(config_from_dict({"data": {"source": source}})) == split
