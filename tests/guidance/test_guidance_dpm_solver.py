"""DPM-Solver++(2M) (Lu et al. 2022, alg. 2) on the Gaussian oracle.

For data N(MU, SD^2 I) the probability-flow ODE is affine and keeps each sample's
standardised coordinate, so a sample started at x_T (level a_T = alpha_bar_{T-1}) must
end at  x_0 = MU + SD (x_T - sqrt(a_T) MU) / sqrt(a_T SD^2 + 1 - a_T)  exactly. That
gives per-sample errors, free of sampling noise. Measured max errors (linear schedule,
T = 1000, logSNR spacing, eps/x0/v alike): 10 steps 1.4e-2, 20 steps 1.0e-2, 50 steps
9e-4, 100 steps 2.6e-4; DDIM at 20 steps: 0.21. Tolerances below are about twice these.
"""
import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion.diffusion.dpm_solver import (dpm_solver, dpm_solver_sample, half_log_snr,
                                                logsnr_timesteps, solver_coefficients,
                                                solver_timesteps)
from ipu_diffusion.diffusion.gaussian import GaussianDiffusion
from ipu_diffusion.diffusion.oracle import gaussian_oracle
from ipu_diffusion.diffusion.respace import respace
from ipu_diffusion.diffusion.sampling import sample
from ipu_diffusion.diffusion.schedules import make_betas

T, MU, SD = 1000, 0.3, 0.2


def _setup(mean_type="eps"):
    d = GaussianDiffusion(make_betas("linear", T), mean_type=mean_type, var_type="fixed_small")
    x_T = tf.random.stateless_normal([2000, 4], [1, 2])
    a = d.alphas_cumprod[-1]
    exact = MU + SD * (x_T.numpy() - np.sqrt(a) * MU) / np.sqrt(a * SD ** 2 + 1 - a)
    return d, gaussian_oracle(d, MU, SD), x_T, exact


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_twenty_steps_match_the_exact_ode_map(mean_type):
    d, oracle, x_T, exact = _setup(mean_type)
    x = dpm_solver(d, oracle, None, steps=20, noise=x_T, clip_denoised=False).numpy()
    assert np.abs(x - exact).max() < 0.02
    assert abs(x.mean() - MU) < 0.01  # SE(mean) = 0.2 / sqrt(8000) = 0.002
    assert abs(x.std() / SD - 1.0) < 0.03  # SE(std) / SD = 1 / sqrt(16000) = 0.008


def test_converges_to_the_ddim_ode_as_steps_grow():
    d, oracle, x_T, exact = _setup()
    ddim = sample(d, oracle, None, sampler="ddim", steps=T, noise=x_T,
                  clip_denoised=False).numpy()  # the ODE with 1000 first-order steps
    gaps = [np.abs(dpm_solver(d, oracle, None, steps=n, noise=x_T, clip_denoised=False).numpy()
                   - ddim).max() for n in (10, 50, 200)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.01, gaps
    ddim20 = sample(d, oracle, None, sampler="ddim", steps=20, spacing="uniform", noise=x_T,
                    clip_denoised=False).numpy()
    dpm20 = sample(d, oracle, None, sampler="dpm_solver", steps=20, noise=x_T,
                   clip_denoised=False).numpy()
    assert np.abs(dpm20 - exact).max() < 0.1 * np.abs(ddim20 - exact).max()


def test_first_order_is_ddim_also_with_guidance():
    d, oracle, x_T, _ = _setup()
    cond_fn = lambda x, t: 0.5 * tf.ones_like(x)  # noqa: E731 (score-form guidance, alg. 2)
    for spacing in ("uniform", "logsnr"):
        small = respace(d, solver_timesteps(d, 15, spacing))
        one = dpm_solver_sample(small, oracle, None, order=1, noise=x_T).numpy()
        ddim = sample(small, oracle, None, sampler="ddim", noise=x_T).numpy()
        np.testing.assert_allclose(one, ddim, atol=2e-5)
    kw = dict(noise=x_T, clip_denoised=False, cond_fn=cond_fn)
    guided = dpm_solver_sample(small, oracle, None, order=1, **kw).numpy()
    np.testing.assert_allclose(guided, sample(small, oracle, None, sampler="ddim", **kw).numpy(),
                               atol=2e-5)
    assert guided.mean() > one.mean() + 0.1  # a positive gradient pushes samples up


def test_coefficients_first_order_ends_and_final_denoise():
    d = respace(GaussianDiffusion(make_betas("linear", T)), logsnr_timesteps(
        GaussianDiffusion(make_betas("linear", T)), 10))
    a, b, c = solver_coefficients(d)
    assert c[0] == 0.0 and c[-1] == 0.0 and np.all(c[1:-1] > 0)  # 1st order at both ends
    assert a[-1] == 0.0 and b[-1] == pytest.approx(1.0)  # the last step returns x0_hat
    lam = half_log_snr(d.alphas_cumprod)[::-1]
    h = np.diff(lam)
    np.testing.assert_allclose(c[1:-1], h[1:] / (2 * h[:-1]))  # 1 / (2 r_i), alg. 2
    np.testing.assert_allclose(np.diff(lam), np.diff(lam).mean(), rtol=0.15)  # ~uniform in lambda


def test_logsnr_spacing_endpoints_and_validation():
    d = GaussianDiffusion(make_betas("linear", T))
    kept = logsnr_timesteps(d, 20)
    assert kept[0] == 0 and kept[-1] == T - 1 and len(kept) == 20
    assert solver_timesteps(d, 20, "uniform") == list(np.round(np.linspace(0, T - 1, 20)).astype(int))
    with pytest.raises(ValueError, match="spacing: 'cosine' is not valid for dpm_solver"):
        solver_timesteps(d, 20, "cosine")
    with pytest.raises(ValueError, match="steps"):
        solver_timesteps(d, 0)
    with pytest.raises(ValueError, match="order"):
        dpm_solver_sample(d, gaussian_oracle(d, MU, SD), (2, 2), order=3)
    with pytest.raises(ValueError, match="eta"):
        sample(d, gaussian_oracle(d, MU, SD), (2, 2), sampler="dpm_solver", eta=0.5)


def test_reproducible_dispatcher_and_intermediates():
    d, oracle, _, _ = _setup()
    a = sample(d, oracle, (16, 4), sampler="dpm_solver", steps=12, seed=5).numpy()
    b = dpm_solver(d, oracle, (16, 4), steps=12, seed=5).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, dpm_solver(d, oracle, (16, 4), steps=12, seed=6).numpy())
    out = dpm_solver(d, oracle, (16, 4), steps=12, seed=5, return_every=4)
    assert out["intermediates"].shape == (3, 16, 4) and out["pred_x0"].shape == (3, 16, 4)
    np.testing.assert_allclose(out["samples"].numpy(), a, atol=1e-6)
    np.testing.assert_allclose(out["intermediates"][-1].numpy(), a, atol=1e-6)
