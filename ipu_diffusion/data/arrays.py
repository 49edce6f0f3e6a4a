"""Array sources: a ``.npz`` file of uint8 images, and TFDS data sets prepared offline.

``.npz``: the images are the array under key ``images`` (or the file's only array),
uint8 NHWC ``[N, H, W, C]`` with C in {1, 3, 4}; an optional ``labels`` array gives
integer labels ``[N]``. Images of another size are centre-cropped and resized.

TFDS: ``tensorflow_datasets`` is imported only when asked for, and only a data set
already prepared under ``data.path`` is read (``download=False``); nothing is fetched.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

from ipu_diffusion.data.common import DataError, check_labels, fit_uint8_array

IMAGE_KEY = "images"
LABEL_KEY = "labels"


def _pick_images(arrays, path: str) -> np.ndarray:
    keys = list(arrays.keys())
    if IMAGE_KEY in keys:
        return arrays[IMAGE_KEY]
    candidates = [k for k in keys if k != LABEL_KEY]
    if len(candidates) == 1:
        return arrays[candidates[0]]
    raise DataError(f"data.path {path!r}: found arrays {keys}; put the images under the key "
                    f"{IMAGE_KEY!r} (or store a single array)")


def check_uint8_images(images: np.ndarray, what: str) -> np.ndarray:
    """Check a uint8 NHWC image array with 1, 3 or 4 channels and at least one image."""
    if images.dtype != np.uint8:
        raise DataError(f"{what}: images must be uint8 in [0, 255], got dtype {images.dtype} "
                        "(convert with np.clip(x, 0, 255).astype(np.uint8))")
    if images.ndim != 4:
        raise DataError(f"{what}: images must have rank 4 [N, H, W, C] (NHWC), got shape "
                        f"{list(images.shape)} (add a channel axis with x[..., None] for grey)")
    if images.shape[-1] not in (1, 3, 4):
        raise DataError(f"{what}: images must have 1, 3 or 4 channels in the last axis "
                        f"(NHWC), got shape {list(images.shape)}")
    if images.shape[0] == 0:
        raise DataError(f"{what}: the image array is empty")
    return images


def load_npz(path: str, size: int, channels: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Images uint8 ``[N, size, size, channels]`` and optional int32 labels ``[N]``."""
    if not path:
        raise DataError("data.path is empty; data.source 'npz' needs the .npz file")
    if not os.path.isfile(path):
        raise DataError(f"data.path {path!r} does not exist or is not a file (data.source 'npz')")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            images = _pick_images(arrays, path)
            labels = arrays[LABEL_KEY] if LABEL_KEY in arrays.files else None
    except (OSError, ValueError) as e:
        raise DataError(f"data.path {path!r} is not a readable .npz file of plain arrays: "
                        f"{e}") from None
    what = f"data.path {path!r}"
    images = check_uint8_images(images, what)
    labels = check_labels(labels, images.shape[0], what)
    return fit_uint8_array(images, size, channels, what), labels


def _tfds_help(name: str, data_dir: str) -> str:
    dest = data_dir or "DIR"
    return ("to prepare it offline: on a machine with network run "
            f"`pip install tensorflow-datasets` and `tfds build {name or 'NAME'} --data_dir "
            f"{dest}`, copy {dest} here, install tensorflow-datasets, and set data.path to "
            f"it and data.tfds_name to {name or 'the data set name'}")


def load_tfds(name: str, data_dir: str, split: str, size: int,
              channels: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """A prepared TFDS split as uint8 ``[N, size, size, channels]`` and int32 labels."""
    if not name:
        raise DataError("data.tfds_name is empty; data.source 'tfds' needs a data set name "
                        "such as 'cifar10'")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"data.source 'tfds' needs the tensorflow_datasets package, which is "
                        f"not installed; {_tfds_help(name, data_dir)}") from None
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        prepared = builder.is_prepared()
    except Exception as e:  # unknown name, bad version string, unreadable data_dir
        raise DataError(f"data.tfds_name {name!r}: {e}; {_tfds_help(name, data_dir)}") from None
    if not prepared:
        raise DataError(f"data.tfds_name {name!r} is not prepared under data.path "
                        f"{data_dir!r}; {_tfds_help(name, data_dir)}")
    splits = sorted(builder.info.splits.keys())
    if split not in splits:
        raise DataError(f"data.tfds_name {name!r} has no {split!r} split; it has {splits}")
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    what = f"TFDS {name!r} split {split!r}"
    images = check_uint8_images(np.asarray(data["image"]), what)
    labels = data.get("label")
    labels = check_labels(np.asarray(labels), images.shape[0], what) if labels is not None else None
    return fit_uint8_array(images, size, channels, what), labels
