"""The single entry to the data: :func:`load_arrays` and :func:`make_dataset`.

``make_dataset`` streams batches from in-memory arrays with tf.data ops only. Keras
``Model.fit`` owns its iterator, so the iterator cannot go into a checkpoint; instead the
order is stateless and a resumed run restarts the stream at its step:

- epoch ``e`` visits the examples in the order ``perm_e``, a permutation drawn
  statelessly from ``(seed, e)``; epochs are chained, so global example position
  ``p`` holds example ``perm_{p // N}[p % N]`` (a batch may span two epochs);
- batch ``b`` carries ``index = b*B .. b*B+B-1``, the global positions ``p``; the
  trainer keys per-example randomness on it (:mod:`ipu_diffusion.rng`), and so does
  the optional horizontal flip here.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

from ipu_diffusion import rng
from ipu_diffusion.data.arrays import load_npz, load_tfds
from ipu_diffusion.data.common import DataError, to_unit_range
from ipu_diffusion.data.digits import load_digits_split
from ipu_diffusion.data.folder import find_images, load_folder

SPLITS = ("train", "test")
#: Sources with a held-out test split: the digits (data.test_fraction of them, stratified)
#: and TFDS sets (their "test" split).
TEST_SPLIT_SOURCES = ("digits", "tfds")
SALT_FLIP = rng.salt_of("random_flip")
_INT64_MAX = np.iinfo(np.int64).max
#: Decoded folder and .npz loads, by what they were asked for and the files' stamps: a
#: training run reads its data for the banner, each fit call and the evaluation.
_FILE_CACHE: Dict[tuple, Tuple[np.ndarray, Optional[np.ndarray]]] = {}
_FILE_CACHE_SIZE = 2


def _files_stamp(source: str, path: str) -> Optional[tuple]:
    """Size and modification time of the file (npz) or of every image file (folder):
    equal stamps, same decoded arrays. None when there is nothing to read (the loader
    then reports it)."""
    try:
        files = [path] if source == "npz" else find_images(path) if os.path.isdir(path) else []
        return tuple((f, st.st_size, st.st_mtime_ns) for f in files for st in [os.stat(f)]) or None
    except OSError:
        return None


def _load_files(loader, source: str, path: str, size: int, channels: int):
    """``loader(path, size, channels)``, or its earlier result while the files are unchanged
    (read-only arrays, shared by the callers)."""
    stamp = _files_stamp(source, path)
    key = (source, os.path.abspath(path), size, channels, stamp)
    if stamp is None or key not in _FILE_CACHE:
        images, labels = loader(path, size, channels)
        if stamp is None:
            return images, labels
        for a in (images, labels):
            if a is not None:
                a.flags.writeable = False
        while len(_FILE_CACHE) >= _FILE_CACHE_SIZE:
            _FILE_CACHE.pop(next(iter(_FILE_CACHE)))
        _FILE_CACHE[key] = (images, labels)
    return _FILE_CACHE[key]


def load_raw(run_config, split: str = "train") -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Images as the source holds them -- uint8 ``[N, H, W, C]`` in [0, 255] (folder, npz,
    tfds) or float32 in [-1, 1] (digits) -- at ``model.image_size`` with
    ``model.in_channels`` channels, and int32 labels ``[N]`` or None."""
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    data = run_config.data
    size, channels = run_config.model.image_size, run_config.model.in_channels
    if channels not in (1, 3):
        raise DataError(f"model.in_channels {channels} is not supported by the data sources; "
                        "use 1 (grey) or 3 (RGB)")
    if data.source == "digits":
        images, labels = load_digits_split(size, channels, data.test_fraction, split)
    elif data.source == "tfds":
        images, labels = load_tfds(data.tfds_name, data.path, split, size, channels)
    elif split == "test":
        raise DataError(f"data.source {data.source!r} has no held-out test split (only "
                        f"{' and '.join(repr(s) for s in TEST_SPLIT_SOURCES)} have one); "
                        "evaluate against split 'train'")
    elif data.source == "folder":
        images, labels = _load_files(load_folder, "folder", data.path, size, channels)
    elif data.source == "npz":
        images, labels = _load_files(load_npz, "npz", data.path, size, channels)
    else:
        raise DataError(f"data.source {data.source!r} is not one of digits, folder, npz, tfds")
    _check_label_config(run_config, labels)
    return images, labels


def _check_label_config(run_config, labels: Optional[np.ndarray]) -> None:
    data, num_classes = run_config.data, run_config.model.num_classes
    if not data.use_labels:
        return
    if labels is None:
        raise DataError(f"data.use_labels is true but data.source {data.source!r} at "
                        f"{data.path or '(embedded)'!r} has no labels (folder: put images in "
                        "one subfolder per class; npz: add a 'labels' array)")
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataError(f"model.num_classes {num_classes} is too small: the labels go up to "
                        f"{int(labels.max())}; set model.num_classes >= {int(labels.max()) + 1}")


def held_out_split(run_config) -> str:
    """The split a trained run is checked against (evaluation, reconstruction, the
    classifier's accuracy): "test" where ``data.source`` has one, else "train"."""
    return "test" if run_config.data.source in TEST_SPLIT_SOURCES else "train"


def load_arrays(run_config, split: str = "train") -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``(images float32 [N, H, W, C] in [-1, 1], labels int32 [N] or None)`` for ``split``
    ("train" or "test") of ``run_config.data``; H = W = ``model.image_size`` and
    C = ``model.in_channels``."""
    images, labels = load_raw(run_config, split)
    if images.dtype == np.uint8:
        images = to_unit_range(images)
    return images, labels


def _permutation(num: int, seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """A permutation of 0..num-1 drawn statelessly from (seed, epoch), int32 [num]."""
    u = tf.random.stateless_uniform([num], seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
    return tf.cast(tf.argsort(u, stable=True), tf.int32)


def batches_from_arrays(images: np.ndarray, labels: Optional[np.ndarray], batch_size: int,
                        seed: int, start_step: int = 0, random_flip: bool = False,
                        slices: Tuple[int, int, int] = (0, 1, 1)) -> tf.data.Dataset:
    """Infinite batches from in-memory arrays; batch ``b`` is a pure function of (seed,
    start_step + b), so a resumed run sees exactly the batches an uninterrupted one would.

    ``images``: uint8 [N, H, W, C] (kept as uint8 in memory: a quarter of float32) or
    float32 in [-1, 1]. Yields {image float32 [B,H,W,C], label int32 [B], index int64 [B]}.

    ``slices = (first, count, total)`` cuts every global batch of ``batch_size`` into
    ``total`` equal slices of S = B / total positions and yields only slices ``first ..
    first + count - 1``, one element each, in order: element ``e`` is slice ``first + e %
    count`` of batch ``start_step + e // count``, positions ``b*B + s*S .. b*B + s*S + S-1``
    (one worker's share under data parallelism; only those examples are gathered).
    """
    num = int(images.shape[0])
    if batch_size <= 0:
        raise DataError(f"batch_size must be > 0, got {batch_size}")
    if batch_size > num:
        raise DataError(f"batch_size {batch_size} is larger than the data set ({num} images)")
    first, count, total = (int(v) for v in slices)
    if total <= 0 or count <= 0 or first < 0 or first + count > total or batch_size % total:
        raise DataError(f"slices {tuple(slices)}: need 0 <= first, first + count <= total and "
                        f"batch_size {batch_size} divisible by total")
    size = batch_size // total
    images_t = tf.constant(images)
    labels_t = tf.constant(labels if labels is not None else np.zeros(num, np.int32), tf.int32)

    def assemble(element):
        step, part = element // count, first + element % count
        pos = step * batch_size + part * size + tf.range(size, dtype=tf.int64)  # [S]
        epoch = pos[0] // num  # a batch spans at most two epochs (batch_size <= num)
        perm = tf.concat([_permutation(num, seed, epoch), _permutation(num, seed, epoch + 1)], 0)
        idx = tf.gather(perm, tf.cast(pos - epoch * num, tf.int32))
        x = tf.gather(images_t, idx)
        if x.dtype == tf.uint8:
            x = tf.cast(x, tf.float32) / 127.5 - 1.0
        if random_flip:
            keys = rng.example_keys(seed, 0, pos)
            mirrored = rng.uniform(keys, (), SALT_FLIP) < 0.5  # [B]
            x = tf.where(mirrored[:, None, None, None], tf.reverse(x, axis=[2]), x)
        return {"image": x, "label": tf.gather(labels_t, idx), "index": pos}

    ds = tf.data.Dataset.range(int(start_step) * count, _INT64_MAX)
    ds = ds.map(assemble, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_dataset(run_config, batch_size: int, seed: int, split: str = "train",
                 start_step: int = 0, slices: Tuple[int, int, int] = (0, 1, 1)
                 ) -> tf.data.Dataset:
    """Infinite, shuffled, deterministic batches of ``split`` as dicts:

    - ``image`` float32 ``[B, H, W, C]`` in [-1, 1], randomly flipped left-right when
      ``data.random_flip`` (Ho et al. 2020, appendix B), keyed by ``(seed, index)``;
    - ``label`` int32 ``[B]`` (zeros when the source has no labels);
    - ``index`` int64 ``[B]``: batch ``b`` holds ``b*B .. b*B+B-1``.

    ``start_step`` k starts at batch k of the same stream (exact resume); ``slices``
    yields only some equal slices of each batch (see :func:`batches_from_arrays`).
    """
    images, labels = load_raw(run_config, split)
    return batches_from_arrays(images, labels, batch_size, seed, start_step,
                               run_config.data.random_flip, slices)
