"""Samplers end to end with the closed-form Gaussian oracle, respacing, guidance hooks.

For data x0 ~ N(MU, SD^2 I) the optimal predictor is known in closed form
(``oracle.gaussian_oracle``), and with it every sampler is a linear-Gaussian recursion
whose output mean and variance :func:`exact_moments` computes exactly in float64 (a
separate transcription of Ho et al. eq. 7/11 and Song et al. eq. 12/16). Each run is
checked twice:
1. the empirical mean/std of N = 4000 x 4 independent values match the exact moments
   within 5 standard errors (SE(mean) = sd / sqrt(N), SE(std) = sd / sqrt(2N)): this
   tests the implementation;
2. the exact moments are within the stated allowance of (MU, SD): this is the sampler's
   own discretisation bias, a property of the algorithm (e.g. 50 DDIM steps with eta = 1
   lose ~21% of the std on this narrow distribution; 1000 DDPM steps ~2%).
MU = 0.3, SD = 0.2 keep x0 inside [-1, 1]; clip_denoised=False throughout.
"""
import math

import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion.diffusion import compiled
from ipu_diffusion.diffusion.gaussian import GaussianDiffusion
from ipu_diffusion.diffusion.oracle import gaussian_oracle
from ipu_diffusion.diffusion.sampling import (cfg_denoise_fn, ddim_invert, ddim_reconstruct,
                                              ddim_sample, ddim_sigmas, ddpm_sample, respace,
                                              sample, slerp, space_timesteps)
from ipu_diffusion.diffusion.schedules import make_betas

import diffusion_reference_np as REF  # tests/diffusion: float64 paper formulas

T, MU, SD = 1000, 0.3, 0.2
SHAPE = (4000, 4)


def _base(mean_type="eps", var_type="fixed_small"):
    return GaussianDiffusion(make_betas("linear", T), mean_type=mean_type, var_type=var_type)


def _optimal_linear(ab):
    """x0_hat = A x + B and eps_hat = C x + E for Gaussian data at level ab."""
    d = ab * SD ** 2 + 1 - ab
    return (math.sqrt(ab) * SD ** 2 / d, MU - ab * SD ** 2 * MU / d,
            math.sqrt(1 - ab) / d, -math.sqrt((1 - ab) * ab) * MU / d)


def exact_moments(d, base, sampler, var_type="fixed_small", eta=0.0):
    """Exact output (mean, std) of a sampler started from x_T ~ N(0, 1)."""
    m, v = 0.0, 1.0
    for i in reversed(range(d.num_timesteps)):
        ab, ab_prev, beta = d.alphas_cumprod[i], d.alphas_cumprod_prev[i], d.betas[i]
        A, B, C, E = _optimal_linear(base.alphas_cumprod[d.timestep_map[i]])
        if sampler == "ddpm":  # eq. 7: mean = c1 x0_hat + c2 x_t
            c1 = beta * math.sqrt(ab_prev) / (1 - ab)
            c2 = (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
            a, b = c1 * A + c2, c1 * B
            noise_var = beta * (1 - ab_prev) / (1 - ab) if var_type == "fixed_small" else (
                beta if i > 0 else d.posterior_variance[1])
        else:  # eq. 12 with sigma from eq. 16
            noise_var = eta ** 2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
            k = math.sqrt(max(1 - ab_prev - noise_var, 0.0))
            a, b = math.sqrt(ab_prev) * A + k * C, math.sqrt(ab_prev) * B + k * E
        m, v = a * m + b, a * a * v + (noise_var if i > 0 else 0.0)
    return m, math.sqrt(v)


# sampler, steps, mean_type, var_type, eta, allowed |std - SD| / SD of the exact moments
CASES = [
    ("ddpm", T, "eps", "fixed_small", 0.0, 0.025),   # exact std 0.1963
    ("ddpm", T, "eps", "fixed_large", 0.0, 0.01),    # exact std 0.2009
    ("ddpm", T, "v", "fixed_large", 0.0, 0.01),
    ("ddim", 50, "eps", "fixed_small", 0.0, 0.13),   # exact std 0.1758
    ("ddim", 50, "eps", "fixed_small", 1.0, 0.22),   # exact std 0.1584
    ("ddim", 50, "x0", "fixed_small", 0.0, 0.13),
]


@pytest.mark.parametrize("sampler,steps,mean_type,var_type,eta,allowance", CASES)
def test_oracle_samples_match_the_data_distribution(sampler, steps, mean_type, var_type, eta, allowance):
    base = _base(mean_type, var_type)
    x = sample(base, gaussian_oracle(base, MU, SD), SHAPE, sampler=sampler, steps=steps, eta=eta,
               seed=11, clip_denoised=False).numpy()
    d = respace(base, space_timesteps(T, f"uniform {steps}")) if steps < T else base
    mean, std = exact_moments(d, base, sampler, var_type, eta)
    n = x.size
    assert abs(x.mean() - mean) < 5 * std / math.sqrt(n)
    assert abs(x.std() - std) < 5 * std / math.sqrt(2 * n)
    assert abs(mean - MU) < 0.002
    assert abs(std - SD) < allowance * SD
    assert np.isfinite(x).all()


def test_parameterisations_give_the_same_deterministic_samples():
    outs = []
    for mean_type in ("eps", "x0", "v"):
        base = _base(mean_type)
        outs.append(sample(base, gaussian_oracle(base, MU, SD), (256, 4), sampler="ddim", steps=50,
                           seed=3, clip_denoised=False).numpy())
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-4)
    np.testing.assert_allclose(outs[2], outs[0], atol=1e-4)


def _linear_eps_model(ab_original):
    """The optimal eps predictor of the Gaussian data, eps_hat = C x + E (``_optimal_linear``),
    as a denoise_fn over original timesteps, and the (C, E) tables it uses (float64)."""
    C, E = np.array([_optimal_linear(a)[2:] for a in ab_original]).T
    C32, E32 = tf.constant(C, tf.float32), tf.constant(E, tf.float32)

    def denoise_fn(x, t):
        return tf.gather(C32, t)[:, None] * x + tf.gather(E32, t)[:, None]

    return denoise_fn, C, E


def _np_ddim_invert(ab, C, E, x0):
    """DDIM eq. 12 with t and t-1 swapped, eta = 0, float64: from x at level a_prev (x_0
    at a_prev = 1) to level a_i, x = sqrt(a_i) x0_hat + sqrt(1 - a_i) eps_hat, where
    eps_hat is the model at the level x is at (at the first level for x_0) and
    x0_hat = (x - sqrt(1 - a_prev) eps_hat) / sqrt(a_prev). ``ab``, ``C``, ``E`` per step."""
    x, a_prev = x0, 1.0
    for i in range(len(ab)):
        j = max(i - 1, 0)
        eps = C[j] * x + E[j]
        x0_hat = (x - math.sqrt(1.0 - a_prev) * eps) / math.sqrt(a_prev)
        x, a_prev = math.sqrt(ab[i]) * x0_hat + math.sqrt(1.0 - ab[i]) * eps, ab[i]
    return x


def _np_ddim_sample(ab, C, E, x):
    """DDIM eq. 12, eta = 0, float64, from level ab[-1] down to x_0 (a_{-1} = 1)."""
    for i in reversed(range(len(ab))):
        eps = C[i] * x + E[i]
        x0_hat = (x - math.sqrt(1.0 - ab[i]) * eps) / math.sqrt(ab[i])
        a_prev = ab[i - 1] if i > 0 else 1.0
        x = math.sqrt(a_prev) * x0_hat + math.sqrt(1.0 - a_prev) * eps
    return x


def test_ddim_inversion_round_trip():
    """Inversion against eq. 12 run backwards in float64 (``_np_ddim_invert``), and the
    round trip: inversion uses eps at the previous level (first order), so the error of
    sampling back shrinks ~1/steps."""
    ab_all = np.cumprod(1.0 - REF.linear_betas(T))
    denoise_fn, C_all, E_all = _linear_eps_model(ab_all)
    x0 = MU + SD * tf.random.stateless_normal((512, 4), [1, 2])
    x0_ = x0.numpy().astype(np.float64)
    base = _base()
    errors = {}
    for steps in (200, T):
        kept = [int(round(i * (T - 1) / (steps - 1))) for i in range(steps)]  # "uniform N"
        d = respace(base, space_timesteps(T, steps)) if steps < T else base
        assert list(d.timestep_map) == kept
        ab, C, E = ab_all[kept], C_all[kept], E_all[kept]
        x_T = ddim_invert(d, denoise_fn, x0)
        np.testing.assert_allclose(x_T.numpy(), _np_ddim_invert(ab, C, E, x0_), rtol=0, atol=5e-5)
        # the latent is (close to) N(0, 1): the inverse of the deterministic sampler
        assert abs(float(tf.math.reduce_std(x_T)) - 1.0) < 0.1
        rec = ddim_sample(d, denoise_fn, None, noise=x_T, clip_denoised=False)
        back = _np_ddim_sample(ab, C, E, x_T.numpy().astype(np.float64))
        np.testing.assert_allclose(rec.numpy(), back, rtol=0, atol=5e-5)
        errors[steps] = float(tf.reduce_max(tf.abs(rec - x0)))
        np.testing.assert_allclose(ddim_reconstruct(d, denoise_fn, x0).numpy(), rec.numpy(),
                                   atol=1e-6)
    assert errors[T] < 0.01 and errors[T] < errors[200] / 3, errors


def test_samplers_are_reproducible_and_seed_dependent():
    base = _base()
    oracle = gaussian_oracle(base, MU, SD)
    fast = respace(base, space_timesteps(T, "ddim20"))
    for fn, kw in [(ddpm_sample, {}), (ddim_sample, {"eta": 1.0}), (ddim_sample, {"eta": 0.0})]:
        a, b, c = (fn(fast, oracle, (16, 4), seed=s, **kw).numpy() for s in (5, 5, 6))
        np.testing.assert_array_equal(a, b)
        assert np.abs(a - c).max() > 1e-2


def test_compiled_chain_is_traced_once_for_new_seeds_and_eta():
    compiled.clear_compiled_cache()
    base = _base()
    fast = respace(base, space_timesteps(T, "uniform 10"))
    oracle = gaussian_oracle(base, MU, SD)
    for seed, eta in [(0, 0.0), (1, 0.5), (2, 1.0)]:
        sample(base, oracle, (8, 4), sampler="ddim", steps=10, eta=eta, seed=seed)
    (callables, fn), = compiled._CACHE.values()
    assert fn.experimental_get_tracing_count() == 1
    xla = ddim_sample(fast, oracle, (8, 4), seed=0, jit_compile=True, clip_denoised=False)
    ref = ddim_sample(fast, oracle, (8, 4), seed=0, clip_denoised=False)
    np.testing.assert_allclose(xla.numpy(), ref.numpy(), atol=1e-4)


def test_return_every_gives_intermediates():
    base = _base()
    fast = respace(base, space_timesteps(T, "uniform 20"))
    oracle = gaussian_oracle(base, MU, SD)
    out = ddpm_sample(fast, oracle, (8, 4), seed=1, return_every=5)
    assert out["intermediates"].shape == (4, 8, 4) and out["pred_x0"].shape == (4, 8, 4)
    np.testing.assert_array_equal(out["intermediates"][-1].numpy(), out["samples"].numpy())
    np.testing.assert_array_equal(out["samples"].numpy(), ddpm_sample(fast, oracle, (8, 4), seed=1).numpy())
    out = ddim_sample(fast, oracle, (8, 4), seed=1, return_every=3)
    assert out["intermediates"].shape == (6, 8, 4)
    with pytest.raises(ValueError, match="return_every"):
        ddim_sample(fast, oracle, (8, 4), return_every=-1)


def test_space_timesteps():
    assert space_timesteps(T, "ddim50") == list(range(0, T, 20))
    assert space_timesteps(T, "uniform 4") == [0, 333, 666, 999] == space_timesteps(T, "4")
    assert space_timesteps(T, 4) == [0, 333, 666, 999]
    assert space_timesteps(100, "uniform 100") == list(range(100))
    quad = space_timesteps(T, "quadratic 10")
    expected = [int(s) for s in np.linspace(0, np.sqrt(800), 10) ** 2]
    assert quad == expected and quad[-1] == 800
    assert len(space_timesteps(T, "quadratic 50")) == 49  # int() repeats 0 once: dropped
    for bad in ["ddim999", "uniform 2000", "sometimes 5", "ddimx", "0"]:
        with pytest.raises(ValueError, match="spec"):
            space_timesteps(T, bad)


def test_respaced_tables_and_ddim_sigma():
    base = _base()
    kept = space_timesteps(T, "ddim25")
    d = respace(base, kept)
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    np.testing.assert_array_equal(d.timestep_map, kept)
    nested = respace(d, [0, 5, 24])  # composes with the parent's map
    np.testing.assert_array_equal(nested.timestep_map, [kept[0], kept[5], kept[24]])
    np.testing.assert_allclose(nested.alphas_cumprod, base.alphas_cumprod[nested.timestep_map], rtol=1e-12)
    assert (d.mean_type, d.var_type, d.loss_type) == (base.mean_type, base.var_type, base.loss_type)
    # eq. 16 with eta = 1 and consecutive steps is the DDPM posterior std sqrt(beta_tilde_t)
    np.testing.assert_allclose(ddim_sigmas(base, 1.0), np.sqrt(base.posterior_variance), rtol=1e-10)
    np.testing.assert_allclose(ddim_sigmas(d, 1.0), np.sqrt(d.posterior_variance), rtol=1e-10)
    assert ddim_sigmas(d, 0.0).max() == 0.0 and ddim_sigmas(d, 1.0)[0] == 0.0
    with pytest.raises(ValueError, match="use_timesteps"):
        respace(base, [5, T])


def test_ddim_eta1_consecutive_equals_ddpm_fixed_small():
    base = _base(var_type="fixed_small")
    d = respace(base, space_timesteps(T, "ddim40"))
    oracle = gaussian_oracle(base, MU, SD)
    noise = tf.random.stateless_normal((64, 4), [4, 4])
    a = ddim_sample(d, oracle, None, eta=1.0, seed=9, noise=noise, clip_denoised=False)
    b = ddpm_sample(d, oracle, None, seed=9, noise=noise, clip_denoised=False)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)  # same noise keys (seed, t)


def test_classifier_guidance_hooks():
    """A constant gradient g: DDIM eps -= sqrt(1 - ab) g; DDPM mean += Sigma g. Both equal a
    sampler run with the correspondingly shifted eps model."""
    base = _base(var_type="fixed_small")
    d = respace(base, space_timesteps(T, "uniform 30"))
    oracle = gaussian_oracle(base, MU, SD)
    g = 0.5
    cond_fn = lambda x, t: tf.fill(tf.shape(x), g)  # noqa: E731
    ab = tf.constant(base.alphas_cumprod, tf.float32)
    # index -> tables of the respaced diffusion, looked up by the original t
    lookup = {int(o): i for i, o in enumerate(d.timestep_map)}
    index_of = tf.constant([lookup.get(o, 0) for o in range(T)], tf.int32)
    shift = d.posterior_variance * np.sqrt(d.alphas) * np.sqrt(1 - d.alphas_cumprod) / d.betas
    shift = tf.constant(shift, tf.float32)

    def ddim_shifted(x, t):
        return oracle(x, t) - tf.sqrt(1 - tf.gather(ab, t))[:, None] * g

    def ddpm_shifted(x, t):  # mean = (x - beta / sqrt(1 - ab) eps) / sqrt(alpha): solve for eps
        return oracle(x, t) - tf.gather(shift, tf.gather(index_of, t))[:, None] * g

    kw = dict(seed=2, clip_denoised=False)
    np.testing.assert_allclose(ddim_sample(d, oracle, (32, 4), cond_fn=cond_fn, **kw).numpy(),
                               ddim_sample(d, ddim_shifted, (32, 4), **kw).numpy(), atol=1e-4)
    np.testing.assert_allclose(ddpm_sample(d, oracle, (32, 4), cond_fn=cond_fn, **kw).numpy(),
                               ddpm_sample(d, ddpm_shifted, (32, 4), **kw).numpy(), atol=1e-4)
    zero = lambda x, t: tf.zeros_like(x)  # noqa: E731
    np.testing.assert_allclose(ddpm_sample(d, oracle, (32, 4), cond_fn=zero, **kw).numpy(),
                               ddpm_sample(d, oracle, (32, 4), **kw).numpy(), atol=1e-6)


def test_classifier_free_guidance_batches_one_forward_pass():
    calls = []

    def model_fn(x, t, y):
        calls.append(int(x.shape[0]))
        return tf.cast(y, tf.float32)[:, None] + tf.zeros_like(x)  # "eps" = label

    y = tf.constant([1, 2, 3])
    x, t = tf.zeros([3, 4]), tf.constant([5, 5, 5])
    for scale, expected in [(0.0, [9, 9, 9]), (1.0, [1, 2, 3]), (3.0, [-15, -12, -9])]:
        out = cfg_denoise_fn(model_fn, y, null_label=9, scale=scale)(x, t).numpy()
        np.testing.assert_allclose(out[:, 0], expected)
    assert calls == [6, 6, 6]
    split = cfg_denoise_fn(lambda x, t, y: tf.concat([model_fn(x, t, y)] * 2, -1) + tf.constant(
        [0.0] * 4 + [100.0] * 4), y, null_label=9, scale=2.0, split_variance=True)(x, t).numpy()
    np.testing.assert_allclose(split[:, 0], [-7, -5, -3])  # 9 + 2 (y - 9)
    np.testing.assert_allclose(split[:, 4], [101, 102, 103])  # variance from the cond pass


def test_slerp():
    z0 = tf.constant([[1.0, 0.0], [2.0, 0.0]])
    z1 = tf.constant([[0.0, 1.0], [4.0, 0.0]])  # second pair parallel: linear fallback
    np.testing.assert_allclose(slerp(z0, z1, 0.0).numpy(), z0.numpy(), atol=1e-6)
    np.testing.assert_allclose(slerp(z0, z1, 1.0).numpy(), z1.numpy(), atol=1e-6)
    mid = slerp(z0, z1, tf.constant([0.5, 0.5])).numpy()
    np.testing.assert_allclose(mid[0], [math.sqrt(0.5)] * 2, atol=1e-6)
    np.testing.assert_allclose(mid[1], [3.0, 0.0], atol=1e-6)
    img = tf.random.stateless_normal([3, 4, 4, 2], [0, 1])
    assert slerp(img, -img + 0.1, 0.3).shape == img.shape


def test_dispatcher_and_validation():
    base = _base()
    oracle = gaussian_oracle(base, MU, SD)
    a = sample(base, oracle, (8, 4), sampler="ddpm", steps=25, seed=4)
    b = ddpm_sample(respace(base, space_timesteps(T, "uniform 25")), oracle, (8, 4), seed=4)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    c = sample(base, oracle, (8, 4), sampler="ddim", steps=25, spacing="quadratic", seed=4)
    assert c.shape == (8, 4)
    with pytest.raises(ValueError, match="ddpm, ddim"):
        sample(base, oracle, (8, 4), sampler="heun")
    with pytest.raises(ValueError, match="eta"):
        sample(base, oracle, (8, 4), sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="steps"):
        sample(base, oracle, (8, 4), steps=T + 1)
    with pytest.raises(ValueError, match="spacing"):
        sample(base, oracle, (8, 4), steps=10, spacing="cosine")
    bf16 = ddim_sample(respace(base, [0, 500, 999]), oracle, None,
                       noise=tf.random.stateless_normal([4, 4], [0, 0], dtype=tf.bfloat16))
    assert bf16.dtype == tf.bfloat16
