"""The near-copy check: copies of training images are flagged, held-out-like images not."""
import numpy as np

from ipu_diffusion.evaluation.run_eval import memorization


def test_copies_are_flagged_and_fresh_samples_are_not():
    rs = np.random.RandomState(0)
    train, test, fresh = (rs.normal(size=(n, 4, 4, 1)) for n in (300, 1000, 1000))
    copied = memorization(train[:50] + 1e-3, train, test)
    assert copied["near_copies"] == 1.0 and copied["nn_train_distance_median"] < 0.01
    new = memorization(fresh, train, test)
    assert new["near_copies"] < 0.05  # same distribution as test: ~1% by construction
    assert abs(new["nn_train_distance_median"] / new["nn_train_distance_median_test"] - 1) < 0.2
