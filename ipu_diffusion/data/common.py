"""Shared pieces of the data sources: the error type, pixel scaling, channel conversion,
centre-crop resizing of whole arrays, and a content identity for caches.

Conventions: images travel as NHWC; sources hand over either uint8 in [0, 255] or
float32 already in [-1, 1]; :func:`to_unit_range` maps uint8 to float32 [-1, 1] with
``x / 127.5 - 1`` (Ho et al. 2020, sec. 3.3: "data ... scaled linearly to [-1, 1]").
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np
import tensorflow as tf

from ipu_diffusion._keras import keras

#: ITU-R BT.601 luma weights, the ones PIL's ``convert("L")`` and
#: ``tf.image.rgb_to_grayscale`` use.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

#: Images resized per call of the TF resize kernel (bounds peak memory).
RESIZE_CHUNK = 512


class DataError(ValueError):
    """A data source that cannot be used; the message names the key or file at fault."""


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` in [0, 255] -> float32 ``[N, H, W, C]`` in [-1, 1]."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def convert_channels(images: np.ndarray, channels: int, what: str) -> np.ndarray:
    """Grey <-> RGB for ``[N, H, W, C]`` arrays (any dtype; uint8 stays uint8).

    1 -> 3 repeats the grey plane; 3 -> 1 takes BT.601 luma; 4 (RGBA) drops alpha
    first. ``what`` names the source in errors.
    """
    have = images.shape[-1]
    if have == 4:
        images, have = images[..., :3], 3
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    if have == 3 and channels == 1:
        grey = images.astype(np.float32) @ np.asarray(LUMA_WEIGHTS, np.float32)
        if images.dtype == np.uint8:
            grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return grey[..., None]
    raise DataError(f"{what}: cannot convert images with {have} channels to model.in_channels "
                    f"{channels}; images need 1, 3 or 4 channels and model.in_channels 1 or 3")


def centre_crop_resize(images: np.ndarray, size: int, method: str = "bicubic") -> np.ndarray:
    """Square centre crop of the shorter side, then resize to ``size`` x ``size``.

    ``images`` ``[N, H, W, C]`` uint8 or float32; returns the same dtype (uint8 results
    are rounded and clipped). Downsampling is antialiased, like PIL's filters that
    guided-diffusion's ``center_crop_arr`` relies on. Works in chunks with a progress
    bar when there is more than one chunk.
    """
    n, h, w = images.shape[:3]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[:, top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(images)
    out = np.empty((n, size, size, images.shape[-1]), images.dtype)
    bar = keras.utils.Progbar(n, unit_name="image") if n > RESIZE_CHUNK else None
    for start in range(0, n, RESIZE_CHUNK):
        chunk = tf.convert_to_tensor(images[start:start + RESIZE_CHUNK], tf.float32)
        resized = tf.image.resize(chunk, (size, size), method=method, antialias=True).numpy()
        if images.dtype == np.uint8:
            resized = np.clip(np.rint(resized), 0, 255)
        out[start:start + len(chunk)] = resized.astype(images.dtype)
        if bar is not None:
            bar.update(min(n, start + RESIZE_CHUNK))
    return out


def fit_uint8_array(images: np.ndarray, size: int, channels: int, what: str) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` of any size -> uint8 ``[N, size, size, channels]``."""
    return centre_crop_resize(convert_channels(images, channels, what), size)


def dataset_identity(images: np.ndarray, labels: Optional[np.ndarray] = None) -> str:
    """A content hash naming an image array (and labels): sha1 over dtype, shape and bytes.

    Caches (evaluation reference statistics, the digits classifier) store this string
    and recompute when it differs.
    """
    h = hashlib.sha1()
    h.update(f"{images.dtype.str}{tuple(images.shape)}".encode("ascii"))
    h.update(np.ascontiguousarray(images).tobytes())
    if labels is not None:
        h.update(f"labels{labels.dtype.str}{tuple(labels.shape)}".encode("ascii"))
        h.update(np.ascontiguousarray(labels).tobytes())
    return f"sha1:{h.hexdigest()}:{'x'.join(str(d) for d in images.shape)}"


def check_labels(labels: Optional[np.ndarray], num: int, what: str) -> Optional[np.ndarray]:
    """Validate optional labels (integers ``[N]``, non-negative) and return int32."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != num:
        raise DataError(f"{what}: labels must have shape [{num}] (one per image), "
                        f"got {list(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what}: labels must be integers, got dtype {labels.dtype}")
    if num and labels.min() < 0:
        raise DataError(f"{what}: labels must be >= 0, found {int(labels.min())}")
    return labels.astype(np.int32)
