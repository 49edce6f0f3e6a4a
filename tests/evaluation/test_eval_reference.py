"""Reference statistics: cached once per (data, network), recomputed when either changes."""
from __future__ import annotations

import os

import numpy as np

from ipu_diffusion.evaluation import FeatureNet, reference_stats


class CountingNet(FeatureNet):
    """Features: 2x2 average pools of the image; logits: the first 3 features."""

    def __init__(self, identity="counting-net:v1"):
        self.identity = identity
        self.calls = 0

    def _batch(self, images):
        self.calls += 1
        n, h, w, c = images.shape
        feats = images.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).reshape(n, -1)
        return feats, feats[:, :3]


def images(seed, n=40):
    return np.random.RandomState(seed).uniform(-1, 1, (n, 4, 4, 1)).astype(np.float32)


def test_cached_statistics_are_reused_not_recomputed(tmp_path):
    net = CountingNet()
    first = reference_stats(images(0), net, str(tmp_path), "toy-train", verbose=False)
    assert first.recomputed and net.calls == 1
    mtime = os.path.getmtime(first.path)
    second = reference_stats(images(0), net, str(tmp_path), "toy-train", verbose=False)
    assert not second.recomputed and net.calls == 1  # the network did not run again
    assert os.path.getmtime(second.path) == mtime
    for key in ("mu", "sigma", "features", "logits"):
        np.testing.assert_array_equal(getattr(first, key), getattr(second, key))
    assert first.features.shape == (40, 4) and first.sigma.shape == (4, 4)
    np.testing.assert_allclose(first.mu, first.features.mean(0))


def test_changed_dataset_or_network_invalidates_the_cache(tmp_path):
    net = CountingNet()
    reference_stats(images(0), net, str(tmp_path), "toy-train", verbose=False)
    changed = reference_stats(images(1), net, str(tmp_path), "toy-train", verbose=False)
    assert changed.recomputed and net.calls == 2
    np.testing.assert_allclose(changed.mu, CountingNet()(images(1), verbose=False)[0].mean(0))
    again = reference_stats(images(1), net, str(tmp_path), "toy-train", verbose=False)
    assert not again.recomputed and net.calls == 2
    other = CountingNet("counting-net:v2")
    assert reference_stats(images(1), other, str(tmp_path), "toy-train", verbose=False).recomputed
    # A half-written pair (the .json record missing) is recomputed, not trusted.
    os.remove(again.path[:-len(".npz")] + ".json")
    assert reference_stats(images(1), net, str(tmp_path), "toy-train", verbose=False).recomputed
