"""respace.RuntimeRespaced: the uniform respacing for a step count that is a tensor gives,
for every step count 1..T, the float32 tables (and timestep map) of the numpy
``respace(diffusion, space_timesteps(T, "uniform S"))`` bit for bit; S = T is the
diffusion itself, as in ``sampling.sample``."""
import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion.diffusion.gaussian import GaussianDiffusion
from ipu_diffusion.diffusion.respace import RuntimeRespaced, respace, space_timesteps
from ipu_diffusion.diffusion.sampling import ddim_sigmas
from ipu_diffusion.diffusion.schedules import make_betas

NAMES = RuntimeRespaced.TABLES + ("ddim_sigma", "timestep_map")


def _numpy_tables(d: GaussianDiffusion):
    tables = [np.asarray(getattr(d, n), np.float32) for n in RuntimeRespaced.TABLES]
    return tables + [ddim_sigmas(d, 1.0).astype(np.float32), d.timestep_map.astype(np.int32)]


@pytest.mark.parametrize("schedule,T", [("cosine", 1000), ("linear", 1000), ("cosine", 7)])
def test_every_step_count_gives_the_numpy_tables_bit_for_bit(schedule, T):
    base = GaussianDiffusion(make_betas(schedule, T))

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32)])
    def tables(steps):
        d = RuntimeRespaced(base, steps)
        return [d._f32[n] for n in RuntimeRespaced.TABLES] + [
            tf.cast(ddim_sigmas(d, 1.0), tf.float32), d.timestep_map]

    for S in range(1, T + 1):
        respaced = base if S == T else respace(base, space_timesteps(T, f"uniform {S}"))
        expected = _numpy_tables(respaced)
        for name, want, got in zip(NAMES, expected, tables(S)):
            got = got.numpy()
            assert got.dtype == want.dtype and got.shape == want.shape == (S,), (S, name)
            # bit patterns: equal floats, and no -0.0 for 0.0
            assert np.array_equal(got.view(np.int32), want.view(np.int32)), (S, name)


def test_only_the_ddim_tables_exist():
    d = RuntimeRespaced(GaussianDiffusion(make_betas("cosine", 10)), 4)
    assert int(d.num_timesteps) == 4 and d.timestep_map.numpy().tolist() == [0, 3, 6, 9]
    with pytest.raises(NotImplementedError, match="posterior_variance"):
        d.coef("posterior_variance", tf.zeros([1], tf.int32), tf.zeros([1, 2]))
    with pytest.raises(TypeError, match="cache"):
        d.fingerprint  # noqa: B018 (the property raises)
