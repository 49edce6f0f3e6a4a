"""Timestep samplers: uniform, loss-aware importance sampling (N&D 2021 section 3.3)."""
import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion.diffusion.losses import (LossAwareSampler, UniformSampler,
                                            make_timestep_sampler)


def _uniforms(n, seed=0):
    return tf.random.stateless_uniform([n], [seed, 7], 1e-7, 1.0)


def test_uniform_sampler():
    sampler = make_timestep_sampler("uniform", 10)
    assert isinstance(sampler, UniformSampler)
    t, w = sampler.sample(tf.constant([0.0, 0.05, 0.1, 0.55, 0.999999]))
    assert t.dtype == tf.int32 and w.dtype == tf.float32
    np.testing.assert_array_equal(t.numpy(), [0, 0, 1, 5, 9])
    np.testing.assert_array_equal(w.numpy(), 1.0)


def _reference_update(history, counts, ts, losses):
    """improved-diffusion's LossSecondMomentResampler.update_with_all_losses, one by one."""
    history, counts = history.copy(), counts.copy()
    K = history.shape[1]
    for t, loss in zip(ts, losses):
        if counts[t] == K:
            history[t, :-1] = history[t, 1:]
            history[t, -1] = loss
        else:
            history[t, counts[t]] = loss
            counts[t] += 1
    return history, counts


def test_update_equals_the_sequential_reference_with_repeated_t():
    T, K = 6, 4
    sampler = LossAwareSampler(T, history=K)
    history, counts = np.zeros([T, K], np.float32), np.zeros([T], np.int32)
    update = tf.function(sampler.update)  # in-graph, as in a compiled train step
    rng = np.random.default_rng(0)
    for step in range(12):
        ts = rng.integers(0, T, size=9)
        ts[:3] = 2  # always several entries for one t in a batch
        losses = rng.random(9).astype(np.float32) + step
        update(tf.constant(ts, tf.int32), tf.constant(losses))
        history, counts = _reference_update(history, counts, ts, losses)
        np.testing.assert_array_equal(sampler.loss_counts.numpy(), counts)
        valid = np.arange(K)[None, :] < counts[:, None]
        np.testing.assert_allclose(np.where(valid, sampler.loss_history.numpy(), 0),
                                   np.where(valid, history, 0), rtol=1e-6)


def test_loss_aware_is_uniform_before_warm_up_then_favours_high_loss():
    T, K = 20, 10
    sampler = make_timestep_sampler("loss_aware", T, history=K, uniform_prob=1e-3)
    u = _uniforms(20000)
    t, w = sampler.sample(u)
    np.testing.assert_array_equal(t.numpy(), np.minimum((u.numpy() * T).astype(int), T - 1))
    np.testing.assert_allclose(w.numpy(), 1.0, rtol=1e-5)
    # Fill all but one slot: still uniform.
    losses = np.where(np.arange(T) == 7, 10.0, 1.0).astype(np.float32)
    for _ in range(K - 1):
        sampler.update(tf.range(T), tf.constant(losses))
    assert not bool(sampler.warmed_up())
    np.testing.assert_allclose(sampler.probs().numpy(), 1.0 / T, rtol=1e-5)
    sampler.update(tf.range(T), tf.constant(losses))
    assert bool(sampler.warmed_up())
    p = sampler.probs().numpy()
    # p_t = (1 - 1e-3) * rms_t / sum(rms) + 1e-3 / T, rms_7 = 10, others 1
    expected = (1 - 1e-3) * losses / losses.sum() + 1e-3 / T
    np.testing.assert_allclose(p, expected, rtol=1e-5)
    t, w = sampler.sample(u)
    freq = np.bincount(t.numpy(), minlength=T) / len(u)
    assert abs(freq[7] - p[7]) < 0.02 and freq[7] > 5 * freq[0]
    np.testing.assert_allclose(w.numpy(), 1.0 / (T * p[t.numpy()]), rtol=1e-5)
    # unbiased: E_p[w * L] equals the uniform mean of L
    assert np.mean(w.numpy() * losses[t.numpy()]) == pytest.approx(losses.mean(), rel=0.05)


def test_sampler_validation():
    with pytest.raises(ValueError, match="uniform, loss_aware"):
        make_timestep_sampler("importance", 10)
    with pytest.raises(ValueError, match="history"):
        LossAwareSampler(10, history=0)
    with pytest.raises(ValueError, match="uniform_prob"):
        LossAwareSampler(10, uniform_prob=2.0)
