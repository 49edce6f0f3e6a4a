"""The digits classifier (accuracy, determinism, cache) and digits_quality end to end."""
from __future__ import annotations

import numpy as np
import pytest

from ipu_diffusion.config import config_from_dict
from ipu_diffusion.data import load_arrays
from ipu_diffusion.evaluation import EvaluationError, digits_quality, load_digits_classifier
from ipu_diffusion.evaluation import digits_classifier as dc

CFG = config_from_dict({"model": {"image_size": 16, "in_channels": 1}})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("eval_cache"))


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return load_digits_classifier(CFG, cache_dir, verbose=False)


def test_classifier_reaches_95_percent_on_the_test_split(classifier):
    x, y = load_arrays(CFG, "test")
    acc = dc.accuracy(classifier.model, x, y)
    assert acc >= 0.95
    assert classifier.record["test_accuracy"] == pytest.approx(acc)
    feats, logits = classifier(x, verbose=False)
    assert feats.shape == (360, dc.FEATURE_DIM) and logits.shape == (360, 10)
    # Features scaled to mean square ~1 on the training split (checked here on test).
    assert 0.5 < np.mean(feats ** 2) < 2.0


def test_cached_classifier_is_reused_and_retrained_when_data_differs(classifier, cache_dir,
                                                                       monkeypatch):
    calls = []
    original = dc.train_digits_classifier

    def quick_train(*args, **kwargs):
        calls.append(1)
        kwargs.update(epochs=1, verbose=False)
        return original(*args, **kwargs)

    monkeypatch.setattr(dc, "train_digits_classifier", quick_train)
    again = load_digits_classifier(CFG, cache_dir, verbose=False)
    assert calls == [] and again.identity == classifier.identity
    other = config_from_dict({"model": {"image_size": 16, "in_channels": 1},
                              "data": {"test_fraction": 0.25}})  # another train split
    with pytest.warns(UserWarning, match="test accuracy"):  # one epoch is not enough
        retrained = load_digits_classifier(other, cache_dir, verbose=False)
    assert calls == [1] and retrained.identity != classifier.identity
    assert retrained.record["data"] != classifier.record["data"]


@pytest.mark.filterwarnings("ignore:the digits classifier reached only")
def test_training_is_deterministic_and_restores_op_determinism():
    from tensorflow.python.framework import config as tf_config

    before = tf_config.is_op_determinism_enabled()
    a, _ = dc.train_digits_classifier(8, 1, 0.2, epochs=1, verbose=False)
    b, _ = dc.train_digits_classifier(8, 1, 0.2, epochs=1, verbose=False)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert tf_config.is_op_determinism_enabled() == before


def test_digits_quality_reports_metrics_next_to_the_floor(classifier, cache_dir):
    x, y = load_arrays(CFG, "train")
    good = digits_quality(x[:300], CFG, cache_dir, labels=y[:300], verbose=False)
    noise = np.random.RandomState(0).uniform(-1, 1, (300, 16, 16, 1)).astype(np.float32)
    bad = digits_quality(noise, CFG, cache_dir, verbose=False)
    for key in ("fid", "kid", "kid_std", "inception_score", "inception_score_std",
                "precision", "recall"):
        assert np.isfinite(good[key]) and np.isfinite(good["floor_" + key])
    assert good["label_agreement"] > 0.95 and "label_agreement" not in bad
    assert good["classifier_test_accuracy"] >= 0.95
    # Real train images score like the floor; noise is far worse on every metric.
    assert good["fid"] < 3 * good["floor_fid"] + 0.1 and bad["fid"] > 20 * good["floor_fid"]
    assert bad["kid"] > 10 * max(good["kid"], good["kid_std"])
    assert bad["precision"] < 0.2 and good["precision"] > 0.7
    assert good["inception_score"] > 7 and bad["inception_score"] < good["inception_score"]
    with pytest.raises(EvaluationError, match="16, 16, 1"):
        digits_quality(np.zeros((10, 8, 8, 1), np.float32), CFG, cache_dir, verbose=False)
    folder = config_from_dict({"data": {"source": "folder", "path": "/nowhere"}})
    with pytest.raises(EvaluationError, match="data.source 'digits'"):
        digits_quality(noise, folder, cache_dir)
