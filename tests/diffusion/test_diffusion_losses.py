"""Losses and likelihood terms: KL, discretised likelihood, VLB terms, training losses."""
import math

import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion.diffusion.gaussian import GaussianDiffusion
from ipu_diffusion.diffusion.losses import (approx_standard_normal_cdf,
                                            discretized_gaussian_log_likelihood, mean_flat,
                                            min_snr_weight, normal_kl, training_losses,
                                            vb_terms_bpd)
from ipu_diffusion.diffusion.schedules import make_betas

import diffusion_reference_np as REF  # tests/diffusion: float64 paper formulas

T = 1000
# float32 against float64: the KL's -1 + e^d - d cancels terms of size 1 (float32 eps
# ~1e-7) down to KLs of ~1e-4 bits at large t, hence the absolute part
TOL_VB = dict(rtol=1e-4, atol=1e-7)


def _normal_cdf(x):
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(x, np.float64) / math.sqrt(2.0)))


def test_normal_kl_zero_and_closed_form():
    m, lv = tf.constant([0.3, -1.0]), tf.constant([0.0, -2.0])
    np.testing.assert_allclose(normal_kl(m, lv, m, lv).numpy(), 0.0, atol=1e-7)
    # KL(N(0, 1) || N(1, 2^2)) = log(2 / 1) + (1 + 1) / (2 * 4) - 1/2
    kl = normal_kl(0.0, 0.0, 1.0, 2.0 * math.log(2.0))
    assert float(kl) == pytest.approx(math.log(2.0) + 0.25 - 0.5, rel=1e-6)


def test_mean_flat():
    x = tf.reshape(tf.range(24, dtype=tf.float32), [2, 3, 4])
    np.testing.assert_allclose(mean_flat(x).numpy(), [5.5, 17.5])


def test_approx_cdf_close_to_exact():
    x = np.linspace(-6, 6, 241).astype(np.float32)
    np.testing.assert_allclose(approx_standard_normal_cdf(x).numpy(), _normal_cdf(x), atol=2e-4)


@pytest.mark.parametrize("mean,log_scale", [(0.0, math.log(0.1)), (0.7, math.log(0.02)),
                                            (-0.99, math.log(0.5)), (0.2, math.log(0.003))])
def test_discretized_likelihood_sums_to_one_over_256_bins(mean, log_scale):
    bins = tf.constant(-1.0 + 2.0 * np.arange(256) / 255.0, tf.float32)
    logp = discretized_gaussian_log_likelihood(bins, tf.fill([256], mean), tf.fill([256], log_scale))
    assert float(tf.reduce_sum(tf.exp(logp))) == pytest.approx(1.0, abs=1e-5)


def test_discretized_likelihood_interior_and_edge_bins():
    x = tf.constant([0.2, -1.0, 1.0])
    means, scale = tf.constant([0.21, -0.9, 0.95]), 0.05
    logp = discretized_gaussian_log_likelihood(x, means, tf.fill([3], math.log(scale))).numpy()
    z = lambda v: (v - means.numpy()) / scale  # noqa: E731
    exact = [_normal_cdf(z(0.2 + 1 / 255))[0] - _normal_cdf(z(0.2 - 1 / 255))[0],
             _normal_cdf(z(-1.0 + 1 / 255))[1], 1.0 - _normal_cdf(z(1.0 - 1 / 255))[2]]
    np.testing.assert_allclose(np.exp(logp), exact, rtol=5e-3)
    far = discretized_gaussian_log_likelihood(tf.constant([1.0]), tf.constant([-1.0]), tf.constant([-8.0]))
    assert float(far[0]) == pytest.approx(math.log(1e-12), rel=1e-5)  # floored, not -inf


def _setup(mean_type="eps", var_type="fixed_small", loss_type="mse", shape=(8, 4, 4, 3), seed=0):
    d = GaussianDiffusion(make_betas("linear", T), mean_type=mean_type, var_type=var_type,
                          loss_type=loss_type)
    x0 = tf.round(tf.random.stateless_uniform(shape, [seed, 0], -1, 1) * 127.5) / 127.5
    noise = tf.random.stateless_normal(shape, [seed, 1])
    t = tf.constant([0, 1, 2, 10, 100, 500, 900, 999][:shape[0]], tf.int32)
    return d, x0, noise, t, d.q_sample(x0, t, noise)


def test_vb_terms_kl_zero_for_the_true_posterior_and_decoder_at_t0():
    d, x0, noise, t, x_t = _setup()
    vb = vb_terms_bpd(d, noise, x0, x_t, t, clip_denoised=False).numpy()
    # Exact eps + fixed_small variance: p(x_{t-1}|x_t) equals q(x_{t-1}|x_t,x_0) for t >= 1.
    np.testing.assert_allclose(vb[1:], 0.0, atol=1e-3)
    # t = 0: decoder NLL with mean = x0_hat = x0 and std = exp(0.5 * clipped log beta_tilde_1).
    std = math.exp(0.5 * d.posterior_log_variance_clipped[0])
    x = x0.numpy()[0]
    p = np.where(x < -0.999, _normal_cdf((1 / 255) / std), np.where(
        x > 0.999, 1 - _normal_cdf(-(1 / 255) / std),
        _normal_cdf((1 / 255) / std) - _normal_cdf(-(1 / 255) / std)))
    assert vb[0] == pytest.approx(-np.mean(np.log2(p)), rel=1e-2)


def _float64(*tensors):
    return [np.asarray(v.numpy(), np.float64) for v in tensors]


def _on_the_pixel_grid(d, noise, t, seed):
    """x0 on the decoder's grid -1 + 2k/255, with the t = 0 example's first image row at
    -1 and its second at +1 (the open edge bins), and its x_t."""
    k = np.random.RandomState(seed).randint(0, 256, size=noise.shape)
    k[0, 0], k[0, 1] = 0, 255
    x0 = tf.constant(-1.0 + 2.0 * k / 255.0, tf.float32)
    return x0, d.q_sample(x0, t, noise)


def test_vb_terms_match_manual_kl():
    """L_t of a learned-range eps model against the float64 formulas (REF): the Gaussian
    KL from the true posterior to the model's N(mu, sigma^2) for t > 0, with mu from Ho et
    al. eq. 11 and log sigma^2 = f log beta_t + (1 - f) log beta_tilde_t (N&D eq. 15,
    f = (v + 1) / 2); the discretised decoder NLL at t = 0 (example 0, edge bins included)."""
    d, _, noise, t, _ = _setup(var_type="learned_range", seed=1)
    x0, x_t = _on_the_pixel_grid(d, noise, t, seed=1)
    v = 0.3
    model_out = tf.concat([noise * 0.9, tf.fill(noise.shape, v)], -1)
    vb = vb_terms_bpd(d, model_out, x0, x_t, t, clip_denoised=False).numpy()
    tab = REF.tables(REF.linear_betas(T))
    x0_, x_t_, eps_ = _float64(x0, x_t, model_out[..., :3])
    t_ = t.numpy()
    f = (v + 1.0) / 2.0
    log_var = (f * REF.per_example(np.log(tab["betas"]), t_, 4)
               + (1.0 - f) * REF.per_example(tab["log_beta_tilde_clipped"], t_, 4)) + 0.0 * x0_
    mean = REF.eps_model_mean(tab, x_t_, t_, eps_)
    expected = REF.vb_bits_per_dim(tab, x0_, x_t_, t_, mean, log_var)
    assert t_[0] == 0 and np.all(expected > 0)
    np.testing.assert_allclose(vb, expected, **TOL_VB)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_simple_losses_use_the_right_target(mean_type):
    d, x0, noise, t, x_t = _setup(mean_type=mean_type)
    target = {"eps": noise, "x0": x0, "v": d.get_v(x0, noise, t)}[mean_type]
    model_out = target + 0.1 * tf.random.stateless_normal(target.shape, [5, 5])
    terms = training_losses(d, model_out, x0, x_t, t, noise)
    expected = np.mean((model_out - target).numpy() ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(terms["mse"].numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(terms["loss"].numpy(), expected, rtol=1e-5)
    assert set(terms) == {"mse", "loss", "unweighted_loss"} and terms["loss"].dtype == tf.float32
    l1 = training_losses(GaussianDiffusion(d.betas, mean_type=mean_type, loss_type="l1"),
                         model_out, x0, x_t, t, noise)
    np.testing.assert_allclose(l1["l1"].numpy(), np.mean(np.abs((model_out - target).numpy()), axis=(1, 2, 3)),
                               rtol=1e-5)
    # min-SNR-gamma (Hang et al. 2023) and importance weights multiply the loss
    gamma, w = 5.0, tf.linspace(0.5, 2.0, 8)
    snr = d.alphas_cumprod[t.numpy()] / (1 - d.alphas_cumprod[t.numpy()])
    snr_w = {"eps": np.minimum(snr, gamma) / snr, "x0": np.minimum(snr, gamma),
             "v": np.minimum(snr, gamma) / (snr + 1)}[mean_type]
    np.testing.assert_allclose(min_snr_weight(d, t, gamma).numpy(), snr_w, rtol=1e-5)
    weighted = training_losses(d, model_out, x0, x_t, t, noise, weights=w, min_snr_gamma=gamma)
    np.testing.assert_allclose(weighted["loss"].numpy(), expected * snr_w * w.numpy(), rtol=1e-5)
    # what a loss-aware sampler records: the loss without the importance weights
    np.testing.assert_allclose(weighted["unweighted_loss"].numpy(), expected * snr_w, rtol=1e-5)


def test_hybrid_vb_gradient_reaches_only_the_variance_channels():
    d, x0, noise, t, x_t = _setup(var_type="learned_range", loss_type="hybrid", seed=2)
    model_out = tf.Variable(tf.concat([noise * 0.8, tf.fill(noise.shape, 0.2)], -1))
    with tf.GradientTape(persistent=True) as tape:
        terms = training_losses(d, model_out, x0, x_t, t, noise)
        vb_sum, loss_sum, mse_sum = (tf.reduce_sum(terms[k]) for k in ("vb", "loss", "mse"))
    g_vb = tape.gradient(vb_sum, model_out).numpy()
    assert np.all(g_vb[..., :3] == 0.0) and np.any(g_vb[..., 3:] != 0.0)
    g_loss, g_mse = tape.gradient(loss_sum, model_out).numpy(), tape.gradient(mse_sum, model_out).numpy()
    np.testing.assert_allclose(g_loss[..., :3], g_mse[..., :3], rtol=1e-6)  # mean: L_simple only
    # lambda * T = 0.001 * 1000: loss = mse + vb (improved-diffusion's RESCALED_MSE)
    np.testing.assert_allclose(terms["loss"].numpy(), (terms["mse"] + terms["vb"]).numpy(), rtol=1e-6)


def test_kl_loss_is_T_times_vb():
    """loss_type kl: vb is L_t of a fixed-large eps model in bits/dim from the float64
    formulas (REF; sigma^2 = beta_t, beta_tilde at the first step), and the loss is T L_t,
    the one-sample estimate of sum_t L_t."""
    d, _, noise, t, _ = _setup(var_type="fixed_large", loss_type="kl", seed=3)
    x0, x_t = _on_the_pixel_grid(d, noise, t, seed=3)
    model_out = noise * 0.9
    terms = training_losses(d, model_out, x0, x_t, t, noise)
    tab = REF.tables(REF.linear_betas(T))
    x0_, x_t_, eps_ = _float64(x0, x_t, model_out)
    t_ = t.numpy()
    log_var = REF.per_example(np.log(tab["fixed_large"]), t_, 4) + 0.0 * x0_
    mean = REF.eps_model_mean(tab, x_t_, t_, eps_)
    expected = REF.vb_bits_per_dim(tab, x0_, x_t_, t_, mean, log_var)
    assert t_[0] == 0 and np.all(expected > 0)
    np.testing.assert_allclose(terms["vb"].numpy(), expected, **TOL_VB)
    np.testing.assert_allclose(terms["loss"].numpy(), T * expected, rtol=TOL_VB["rtol"],
                               atol=T * TOL_VB["atol"])
    with pytest.raises(ValueError, match="min_snr_gamma"):
        training_losses(d, model_out, x0, x_t, t, noise, min_snr_gamma=-1.0)
