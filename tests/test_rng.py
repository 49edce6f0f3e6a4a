"""Per-example counter-based randomness: distribution, independence, batch invariance."""
import numpy as np
import tensorflow as tf

from ipu_diffusion import rng


def test_uniform_and_normal_moments():
    keys = rng.example_keys(3, 7, tf.range(20000))
    u = rng.uniform(keys, (4,), salt=11).numpy()
    z = rng.normal(keys, (4,), salt=12).numpy()
    assert 0.0 < u.min() and u.max() < 1.0
    # Standard errors with 80k draws: mean 0.001, variance ~0.0005; 5-sigma bounds.
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02
    assert abs(np.corrcoef(z[:, 0], z[:, 1])[0, 1]) < 0.03


def test_draws_depend_only_on_the_example():
    idx = tf.range(64)
    full = rng.normal(rng.example_keys(0, 1, idx), (3, 3), salt=5).numpy()
    part = rng.normal(rng.example_keys(0, 1, idx[16:32]), (3, 3), salt=5).numpy()
    np.testing.assert_array_equal(full[16:32], part)
    other_step = rng.normal(rng.example_keys(0, 2, idx), (3, 3), salt=5).numpy()
    other_salt = rng.normal(rng.example_keys(0, 1, idx), (3, 3), salt=6).numpy()
    assert not np.allclose(full, other_step) and not np.allclose(full, other_salt)


def test_randint_covers_range_evenly():
    t = rng.randint(rng.example_keys(1, 0, tf.range(50000)), 10, salt=1).numpy()
    counts = np.bincount(t, minlength=10)
    assert t.min() == 0 and t.max() == 9
    assert np.all(np.abs(counts - 5000) < 5 * np.sqrt(5000))  # 5-sigma binomial bound
