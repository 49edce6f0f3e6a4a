"""GaussianDiffusion: tables, posterior, parameterisations, p_mean_variance."""
import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion.config import ConfigError, DiffusionConfig
from ipu_diffusion.diffusion.gaussian import GaussianDiffusion, model_output_channels
from ipu_diffusion.diffusion.schedules import make_betas

import diffusion_reference_np as REF  # tests/diffusion: float64 paper formulas

T = 1000


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(make_betas("linear", T))


def _batch(seed, shape=(T, 2, 3, 2)):
    """x0 in [-1, 1], noise, and t = 0..T-1 (one example per timestep)."""
    x0 = tf.random.stateless_uniform(shape, [seed, 0], -1.0, 1.0)
    noise = tf.random.stateless_normal(shape, [seed, 1])
    return x0, noise, tf.range(shape[0], dtype=tf.int32) % T


def test_tables_closed_forms(diffusion):
    d = diffusion
    np.testing.assert_allclose(d.alphas_cumprod, np.cumprod(1.0 - d.betas), rtol=1e-14)
    assert d.alphas_cumprod_prev[0] == 1.0 and d.alphas_cumprod_next[-1] == 0.0
    np.testing.assert_allclose(d.sqrt_recipm1_alphas_cumprod ** 2, 1 / d.alphas_cumprod - 1, rtol=1e-12)
    assert d.posterior_variance[0] == 0.0
    np.testing.assert_allclose(d.posterior_log_variance_clipped[0], np.log(d.posterior_variance[1]))
    np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]))
    assert all(getattr(d, n).dtype == np.float64 for n in ("betas", "posterior_mean_coef1"))
    assert d.timestep_map.dtype == np.int64 and (d.timestep_map == np.arange(T)).all()


def _conditioning(d, i):
    """q(x_{t-1} | x_t, x_0) from the joint Gaussian of (x_{t-1}, x_t) given x_0:
    x_{t-1} ~ N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}), x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) z.
    Returns (coef of x0, coef of x_t, variance)."""
    ab_prev = 1.0 if i == 0 else np.prod(1.0 - d.betas[:i])
    ab = ab_prev * (1.0 - d.betas[i])
    var_prev, var_t = 1.0 - ab_prev, 1.0 - ab
    cov = np.sqrt(1.0 - d.betas[i]) * var_prev
    gain = cov / var_t  # regression of x_{t-1} on x_t
    return np.sqrt(ab_prev) - gain * np.sqrt(ab), gain, var_prev - gain * cov


def test_posterior_equals_gaussian_conditioning(diffusion):
    d = diffusion
    coefs = np.array([_conditioning(d, i) for i in range(T)])
    np.testing.assert_allclose(d.posterior_mean_coef1, coefs[:, 0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d.posterior_mean_coef2, coefs[:, 1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d.posterior_variance, coefs[:, 2], rtol=1e-7, atol=1e-15)
    x0, noise, t = _batch(0)
    x_t = d.q_sample(x0, t, noise)
    mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, t)
    c = coefs[:, :, None, None, None]
    np.testing.assert_allclose(mean.numpy(), c[:, 0] * x0.numpy() + c[:, 1] * x_t.numpy(), atol=2e-6)
    np.testing.assert_allclose(var.numpy(), np.broadcast_to(c[:, 2], var.shape), rtol=1e-5, atol=1e-12)
    assert log_var.shape == x0.shape


def test_q_sample_and_q_mean_variance(diffusion):
    x0, noise, t = _batch(1)
    x_t = diffusion.q_sample(x0, t, noise).numpy()
    ab = diffusion.alphas_cumprod[:, None, None, None]
    np.testing.assert_allclose(x_t, np.sqrt(ab) * x0.numpy() + np.sqrt(1 - ab) * noise.numpy(), atol=2e-6)
    mean, var, log_var = diffusion.q_mean_variance(x0, t)
    np.testing.assert_allclose(var.numpy(), np.broadcast_to(1 - ab, var.shape), rtol=1e-5)
    np.testing.assert_allclose(np.exp(log_var.numpy()), var.numpy(), rtol=1e-5)


def test_eps_x0_v_round_trips(diffusion):
    d = diffusion
    x0, noise, t = _batch(2)
    x_t = d.q_sample(x0, t, noise)
    x0_hat = d.predict_x0_from_eps(x_t, t, noise)
    np.testing.assert_allclose(x0_hat.numpy(), x0.numpy(), atol=2e-3)  # 1/sqrt(ab) ~ 150 at T
    np.testing.assert_allclose(d.predict_eps_from_x0(x_t, t, x0_hat).numpy(), noise.numpy(), atol=1e-4)
    v = d.get_v(x0, noise, t)
    np.testing.assert_allclose(d.predict_x0_from_v(x_t, t, v).numpy(), x0.numpy(), atol=1e-5)
    np.testing.assert_allclose(d.predict_eps_from_v(x_t, t, v).numpy(), noise.numpy(), atol=1e-5)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
def test_p_mean_variance_with_the_true_target(mean_type, var_type):
    """Fed the exact target, the model's reverse mean is the true posterior mean."""
    d = GaussianDiffusion(make_betas("cosine", T), mean_type=mean_type, var_type=var_type)
    x0, noise, t = _batch(3)
    x_t = d.q_sample(x0, t, noise)
    target = {"eps": noise, "x0": x0, "v": d.get_v(x0, noise, t)}[mean_type]
    out_ch = d.model_output_channels(2)
    model_out = target if out_ch == 2 else tf.concat([target, tf.zeros_like(target)], -1)
    out = d.p_mean_variance(model_out, x_t, t, clip_denoised=False)
    true_mean, _, _ = d.q_posterior_mean_variance(x0, x_t, t)
    late = slice(0, 900)  # eps -> x0 divides by sqrt(alpha_bar), tiny for cosine near T
    np.testing.assert_allclose(out["pred_x0"].numpy()[late], x0.numpy()[late], atol=2e-3)
    np.testing.assert_allclose(out["pred_eps"].numpy()[900:], noise.numpy()[900:], atol=1e-3)
    np.testing.assert_allclose(out["mean"].numpy(), true_mean.numpy(), atol=2e-3)
    assert set(out) == {"mean", "variance", "log_variance", "pred_x0", "pred_eps"}
    assert all(v.shape == x_t.shape for v in out.values())
    first = 1 if var_type == "fixed_small" else 0  # beta_tilde = 0 at t = 0; its log is clipped
    np.testing.assert_allclose(np.exp(out["log_variance"].numpy()[first:]),
                               out["variance"].numpy()[first:], rtol=1e-5)


def test_fixed_variances():
    """fixed_small / fixed_large variances and log-variances per timestep, and the mean,
    against the float64 formulas (REF): beta_tilde_t with its log clipped at the first
    step; beta_t with beta_tilde at the first step (Ho et al. 2020, section 3.2); the
    mean of an eps model by Ho et al. eq. 11 (another form than the posterior's eq. 7)."""
    x0, noise, t = _batch(4)
    tab = REF.tables(REF.linear_betas(T))
    for var_type, var, log_var in [
            ("fixed_small", tab["fixed_small"], tab["log_beta_tilde_clipped"]),
            ("fixed_large", tab["fixed_large"], np.log(tab["fixed_large"]))]:
        d = GaussianDiffusion(make_betas("linear", T), var_type=var_type)
        x_t = d.q_sample(x0, t, noise)
        out = d.p_mean_variance(noise, x_t, t, clip_denoised=False)
        for key, expected in [("variance", var), ("log_variance", log_var)]:
            got = out[key].numpy()
            np.testing.assert_array_equal(got, np.broadcast_to(got[:, :1, :1, :1], got.shape))
            np.testing.assert_allclose(got[:, 0, 0, 0], expected, rtol=1e-6, atol=1e-30,
                                       err_msg=key)
        mean = REF.eps_model_mean(tab, x_t.numpy().astype(np.float64), t.numpy(),
                                  noise.numpy().astype(np.float64))
        np.testing.assert_allclose(out["mean"].numpy(), mean, rtol=0, atol=2e-6)


def test_learned_range_end_points():
    """N&D eq. 15: v = -1 -> clipped log beta_tilde_t, v = +1 -> log beta_t."""
    d = GaussianDiffusion(make_betas("linear", T), var_type="learned_range")
    x0, noise, t = _batch(5)
    x_t = d.q_sample(x0, t, noise)
    for v, expected in [(-1.0, d.posterior_log_variance_clipped), (1.0, np.log(d.betas)),
                        (0.0, 0.5 * (d.posterior_log_variance_clipped + np.log(d.betas)))]:
        out = d.p_mean_variance(tf.concat([noise, tf.fill(noise.shape, v)], -1), x_t, t)
        np.testing.assert_allclose(out["log_variance"].numpy(),
                                   np.broadcast_to(expected[:, None, None, None], x_t.shape), rtol=1e-5)


def test_clip_denoised_clips_x0_and_keeps_eps_consistent(diffusion):
    x_t = tf.fill([4, 3], 5.0)
    t = tf.constant([10, 100, 500, 999])
    out = diffusion.p_mean_variance(tf.fill([4, 3], -3.0), x_t, t, clip_denoised=True)
    assert np.all(np.abs(out["pred_x0"].numpy()) <= 1.0)
    np.testing.assert_allclose(diffusion.predict_x0_from_eps(x_t, t, out["pred_eps"]).numpy(),
                               out["pred_x0"].numpy(), atol=1e-3)


def test_bfloat16_inputs_give_bfloat16_outputs(diffusion):
    x0, noise, t = _batch(6, shape=(8, 4, 4, 3))
    x_t = diffusion.q_sample(tf.cast(x0, tf.bfloat16), t, tf.cast(noise, tf.bfloat16))
    assert x_t.dtype == tf.bfloat16
    out = diffusion.p_mean_variance(tf.cast(noise, tf.bfloat16), x_t, t)
    assert all(v.dtype == tf.bfloat16 for v in out.values())
    ref = diffusion.q_sample(x0, t, noise)
    np.testing.assert_allclose(tf.cast(x_t, tf.float32).numpy(), ref.numpy(), atol=2e-2)


def test_validation_and_helpers():
    betas = make_betas("linear", T)
    with pytest.raises(ValueError, match="mean_type.*eps, x0, v"):
        GaussianDiffusion(betas, mean_type="score")
    with pytest.raises(ValueError, match="var_type"):
        GaussianDiffusion(betas, var_type="learned")
    with pytest.raises(ValueError, match="loss_type.*mse, l1, hybrid, kl"):
        GaussianDiffusion(betas, loss_type="rescaled_mse")
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(np.array([0.1, 1.5]))
    with pytest.raises(ValueError, match="timestep_map"):
        GaussianDiffusion(betas[:3], timestep_map=[0, 5])
    assert model_output_channels(3, "learned_range") == 6 and model_output_channels(3, "fixed_small") == 3
    d = GaussianDiffusion.from_config(DiffusionConfig(schedule="cosine", timesteps=100, mean_type="v"))
    assert d.num_timesteps == 100 and d.mean_type == "v" and d.var_type == "fixed_large"
    # the linear schedule's 1000 / T scaling puts beta_T = 20 / T above 0.999 for T < 21
    with pytest.raises(ConfigError, match=r"diffusion.timesteps: 20 .* 'linear'.*T >= 21"):
        GaussianDiffusion.from_config(DiffusionConfig(timesteps=20))
    assert GaussianDiffusion.from_config(DiffusionConfig(timesteps=21)).num_timesteps == 21
    single = GaussianDiffusion(betas[:1])  # one step: the clipped log-variance falls back to beta_1
    assert np.isfinite(single.posterior_log_variance_clipped).all()
