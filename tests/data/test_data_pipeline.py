"""make_dataset: batch contract, determinism, epoch order, flips, exact resume by step."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion.config import config_from_dict
from ipu_diffusion.data import DataError, make_dataset


def take(ds, n):
    it = iter(ds)
    return [{k: v.numpy() for k, v in next(it).items()} for _ in range(n)]


def digits_cfg(flip=False):
    return config_from_dict({"model": {"image_size": 16, "in_channels": 1},
                             "data": {"random_flip": flip}})


@pytest.fixture()
def tiny_npz(tmp_path):
    """Ten 4x4 RGB images; image i has all pixels equal to 20*i and label i."""
    images = np.arange(10, dtype=np.uint8)[:, None, None, None] * 20
    images = images * np.ones((1, 4, 4, 3), np.uint8)
    path = str(tmp_path / "tiny.npz")
    np.savez(path, images=images, labels=np.arange(10))
    return config_from_dict({"model": {"image_size": 4, "in_channels": 3},
                             "data": {"source": "npz", "path": path}})


def test_batch_contract_and_running_index():
    batches = take(make_dataset(digits_cfg(), batch_size=32, seed=0), 3)
    for b, batch in enumerate(batches):
        assert batch["image"].shape == (32, 16, 16, 1) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
        assert batch["index"].dtype == np.int64
        np.testing.assert_array_equal(batch["index"], b * 32 + np.arange(32))
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_same_seed_same_batches_other_seed_differs():
    a = take(make_dataset(digits_cfg(flip=True), 16, seed=5), 4)
    b = take(make_dataset(digits_cfg(flip=True), 16, seed=5), 4)
    c = take(make_dataset(digits_cfg(flip=True), 16, seed=6), 4)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_each_epoch_is_a_permutation_and_labels_follow_images(tiny_npz):
    batches = take(make_dataset(tiny_npz, batch_size=5, seed=1), 6)  # 3 epochs of 10
    labels = np.concatenate([b["label"] for b in batches])
    for epoch in range(3):
        assert sorted(labels[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert not np.array_equal(labels[:10], labels[10:20])  # reshuffled per epoch
    for b in batches:  # pixel value 20*i identifies image i
        np.testing.assert_allclose(b["image"][:, 0, 0, 0], b["label"] * 20 / 127.5 - 1, atol=1e-6)


def test_flip_is_keyed_by_index_and_only_mirrors():
    plain = take(make_dataset(digits_cfg(flip=False), 64, seed=3), 2)
    flipped = take(make_dataset(digits_cfg(flip=True), 64, seed=3), 2)
    mirrored = same = 0
    for p, f in zip(plain, flipped):
        np.testing.assert_array_equal(p["index"], f["index"])
        for x, y in zip(p["image"], f["image"]):
            if np.array_equal(x, y):
                same += 1
            else:
                np.testing.assert_array_equal(x[:, ::-1], y)
                mirrored += 1
    assert mirrored > 30 and same > 30  # about half of 128 each


def test_start_step_resumes_with_the_identical_batches():
    full = take(make_dataset(digits_cfg(flip=True), 48, seed=7), 33)
    # batch 30 spans the first epoch boundary (1437 / 48 ~ 29.9 batches)
    resumed = take(make_dataset(digits_cfg(flip=True), 48, seed=7, start_step=29), 4)
    for want, got in zip(full[29:], resumed):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_labels_zero_without_source_labels_and_bad_arguments(tmp_path):
    path = str(tmp_path / "nolabels.npz")
    np.savez(path, images=np.zeros((4, 4, 4, 1), np.uint8))
    config = config_from_dict({"model": {"image_size": 4, "in_channels": 1},
                               "data": {"source": "npz", "path": path}})
    batch = take(make_dataset(config, 3, seed=0), 1)[0]
    np.testing.assert_array_equal(batch["label"], [0, 0, 0])
    with pytest.raises(DataError, match="batch_size"):
        make_dataset(config, 0, seed=0)
    too_few = config_from_dict({"model": {"image_size": 16, "in_channels": 1, "num_classes": 5},
                                "data": {"use_labels": True}})
    with pytest.raises(DataError, match="model.num_classes 5"):
        make_dataset(too_few, 8, seed=0)
