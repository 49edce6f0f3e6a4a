"""Beta schedules: closed forms (Ho et al. 2020 section 4; Nichol & Dhariwal 2021 eq. 17)."""
import math

import numpy as np
import pytest

from ipu_diffusion.diffusion.schedules import SCHEDULES, make_betas


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [50, 1000, 4000])
def test_schedules_are_valid_tables(name, T):
    betas = make_betas(name, T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert np.all(betas > 0) and np.all(betas <= 0.999)
    assert np.all(np.diff(betas) >= -1e-15)  # non-decreasing


def test_linear_endpoints_at_1000_and_scaled_at_4000():
    b = make_betas("linear", 1000)
    assert b[0] == pytest.approx(1e-4, abs=1e-15) and b[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=1e-9)
    b4 = make_betas("linear", 4000)  # both ends scaled by 1000 / 4000
    assert b4[0] == pytest.approx(2.5e-5, abs=1e-15) and b4[-1] == pytest.approx(0.005, abs=1e-15)


def test_cosine_alpha_bar_matches_eq17():
    T, s = 1000, 0.008
    betas = make_betas("cosine", T)
    alpha_bar = np.cumprod(1.0 - betas)

    def f(t):  # eq. 17, written out independently
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    expected = np.array([f(t) / f(0) for t in range(1, T + 1)])
    unclipped = betas < 0.999  # the clip only bites at the very end
    assert unclipped[:-1].all()
    np.testing.assert_allclose(alpha_bar[:-1], expected[:-1], rtol=1e-10)
    assert betas[-1] == 0.999


def test_quadratic_and_sigmoid_reference_forms():
    T = 1000
    np.testing.assert_allclose(make_betas("quadratic", T),
                               np.linspace(1e-4 ** 0.5, 0.02 ** 0.5, T) ** 2, rtol=1e-12)
    x = np.linspace(-6, 6, T)
    np.testing.assert_allclose(make_betas("sigmoid", T),
                               (0.02 - 1e-4) / (1 + np.exp(-x)) + 1e-4, rtol=1e-12)


def test_bad_arguments_name_the_choices():
    with pytest.raises(ValueError, match="linear, cosine, quadratic, sigmoid"):
        make_betas("exponential", 1000)
    with pytest.raises(ValueError, match="T"):
        make_betas("linear", 0)
    with pytest.raises(ValueError, match="cosine"):  # linear betas would exceed 0.999
        make_betas("linear", 10)
    assert make_betas("cosine", 10).shape == (10,)
