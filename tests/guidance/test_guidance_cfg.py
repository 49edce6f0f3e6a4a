"""Classifier-free guidance (Ho & Salimans 2022) on a tiny class-conditional U-Net:
scale 1 is the conditional model, scale 0 the unconditional (null-label) one, in one
batched forward pass, in every sampler, without retracing when labels or scale change."""
import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion.config import ModelConfig
from ipu_diffusion.diffusion.gaussian import GaussianDiffusion
from ipu_diffusion.diffusion.guidance import (GuidanceError, cfg_denoise_fn, cfg_guide,
                                              conditional_guide, cycle_labels)
from ipu_diffusion.diffusion.sampling import sample
from ipu_diffusion.diffusion.schedules import make_betas
from ipu_diffusion.models.unet import build_unet

K = 3  # classes; label K is the null label
B = 4


@pytest.fixture(scope="module")
def unet():
    cfg = ModelConfig(image_size=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(4,), num_groups=4, dropout=0.0, num_classes=K)
    tf.random.set_seed(0)
    return build_unet(cfg, zero_init=False)  # every path carries signal, labels included


def _model_fn(unet, calls=None):
    def model_fn(x, t, y):
        if calls is not None:
            calls.append(int(x.shape[0]))
        return unet(x, t, y)

    return model_fn


def _inputs():
    x = tf.random.stateless_normal([B, 8, 8, 1], [1, 2])
    return x, tf.constant([5, 300, 600, 999]), np.array([0, 1, 2, 1], np.int32)


@pytest.mark.keras2  # model code: also under Keras 2 (tf_keras)
def test_scale_one_is_conditional_and_zero_unconditional_in_one_pass(unet):
    x, t, y = _inputs()
    cond, uncond = unet(x, t, y).numpy(), unet(x, t, np.full(B, K)).numpy()
    assert np.abs(cond - uncond).max() > 1e-3  # the labels matter
    calls = []
    for scale, expected in [(1.0, cond), (0.0, uncond), (3.0, uncond + 3.0 * (cond - uncond))]:
        out = cfg_denoise_fn(_model_fn(unet, calls), y, K, scale)(x, t).numpy()
        np.testing.assert_allclose(out, expected, atol=2e-5)
    assert calls == [2 * B] * 3  # one call over the doubled batch per evaluation


def test_every_sampler_guided_matches_its_limits(unet):
    """In every sampler the cfg Guide at scale 1 / 0 gives exactly the conditional /
    null-label samples, the compiled chain's body makes one (batched) network call, and
    changing labels or scale does not retrace."""
    _, _, y = _inputs()
    d = GaussianDiffusion(make_betas("linear", 1000))
    shape = (B, 8, 8, 1)
    for sampler in ("ddpm", "ddim", "dpm_solver"):
        guide_calls, cond_calls = [], []
        guide = cfg_guide(_model_fn(unet, guide_calls), K)
        cond = conditional_guide(_model_fn(unet, cond_calls))
        kw = dict(sampler=sampler, steps=2, seed=7)
        ref_cond = sample(d, cond.set(y).denoise_fn, shape, **kw).numpy()
        ref_null = sample(d, cond.set(np.full(B, K)).denoise_fn, shape, **kw).numpy()
        guided_cond = sample(d, guide.set(y, 1.0).denoise_fn, shape, **kw).numpy()
        guided_null = sample(d, guide.set(y, 0.0).denoise_fn, shape, **kw).numpy()
        np.testing.assert_allclose(guided_cond, ref_cond, atol=1e-4, err_msg=sampler)
        np.testing.assert_allclose(guided_null, ref_null, atol=1e-4, err_msg=sampler)
        assert cond_calls == [B] and guide_calls == [2 * B], sampler  # traced once each


def test_learned_variance_guides_only_the_mean_channels():
    def model_fn(x, t, y):  # mean channel = label, variance channel = 10 * label
        lab = tf.cast(y, tf.float32)[:, None, None, None] + tf.zeros_like(x)
        return tf.concat([lab, 10.0 * lab], axis=-1)

    x, t = tf.zeros([2, 2, 2, 1]), tf.constant([1, 2])
    out = cfg_denoise_fn(model_fn, [1, 2], 5, 2.0, split_variance=True)(x, t).numpy()
    np.testing.assert_allclose(out[:, 0, 0, 0], [5 + 2 * (1 - 5), 5 + 2 * (2 - 5)])
    np.testing.assert_allclose(out[:, 0, 0, 1], [10.0, 20.0])  # from the conditional pass


def test_cycle_labels():
    np.testing.assert_array_equal(cycle_labels(7, 3), [0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(cycle_labels(3, 10, label=4), [4, 4, 4])
    with pytest.raises(GuidanceError, match="--label: 10 is not a class; choose 0..9"):
        cycle_labels(3, 10, label=10)
    with pytest.raises(GuidanceError, match="num_classes"):
        cycle_labels(3, 0)
