"""Classifier guidance (Dhariwal & Nichol 2021, algorithms 1 and 2) against closed forms,
and the noise-aware classifier built from the U-Net's encoder half.

On a two-class Gaussian mixture (guidance_oracles.py) the exact unconditional eps plus
the exact classifier gradient at scale 1 must sample the class-conditional N(mu_y, S^2):
the tolerances below (mean within 0.03 of mu_y, >= 99% of samples on the class's side)
allow for the samplers' discretisation (measured: mean error <= 0.01 for DDIM 50,
DDPM 100 and DPM-Solver++ 20 steps; 2000 samples, SE(mean) = 0.15 / sqrt(2000) = 0.003).
"""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from guidance_oracles import MEANS, class_logits, closed_form_grad, mixture_eps
from ipu_diffusion.config import config_from_dict
from ipu_diffusion.diffusion.gaussian import GaussianDiffusion
from ipu_diffusion.diffusion.guidance import (GuidanceError, classifier_cond_fn,
                                              classifier_log_prob_grad)
from ipu_diffusion.diffusion.sampling import guided_x0_eps, sample
from ipu_diffusion.diffusion.schedules import make_betas
from ipu_diffusion.models.unet import build_unet
from ipu_diffusion.inference import classifier as C
from ipu_diffusion.training.classifier import train_classifier

N = 2000


def _diffusion():
    return GaussianDiffusion(make_betas("linear", 1000), var_type="fixed_small")


def test_gradient_matches_closed_form_sign_and_scale():
    d = _diffusion()
    x = tf.random.stateless_normal([6, 2], [0, 1])
    t = tf.constant([0, 50, 200, 500, 800, 999])
    for y in (0, 1):
        labels = np.full([6], y, np.int32)
        grad = classifier_log_prob_grad(class_logits(d), x, t, labels).numpy()
        np.testing.assert_allclose(grad, closed_form_grad(d, x.numpy(), t.numpy(), y), atol=1e-5)
        # it points from the other class's mean towards mu_y (the means differ along (1, 1))
        assert np.all(np.sign(grad @ (MEANS[y] - MEANS[1 - y])) > 0)
        scaled = classifier_cond_fn(class_logits(d), labels, 2.5)(x, t).numpy()
        np.testing.assert_allclose(scaled, 2.5 * grad, rtol=1e-5, atol=1e-6)


def test_guided_step_stays_in_range_and_consistent_at_tiny_alpha_bar():
    # cosine T = 1000: alpha_bar at the last step is ~2.4e-9, where the score-form shift of
    # x0_hat is (1 - alpha_bar) / sqrt(alpha_bar) ~ 2e4 times the gradient
    d = GaussianDiffusion(make_betas("cosine", 1000), var_type="fixed_small")
    x = tf.random.stateless_normal([4, 3], [0, 2])
    t = tf.fill([4], 999)
    eps_model = tf.random.stateless_normal([4, 3], [0, 3])
    grad = lambda x_t, t_orig: tf.ones_like(x_t)  # noqa: E731 (a constant unit gradient)
    x0, eps = guided_x0_eps(d, eps_model, x, t, t, grad, clip=True)
    ab = d.alphas_cumprod[999]
    assert np.all(np.abs(x0.numpy()) <= 1.0)
    np.testing.assert_allclose(np.sqrt(ab) * x0.numpy() + np.sqrt(1 - ab) * eps.numpy(),
                               x.numpy(), atol=1e-5)  # the pair still reproduces x_t
    x0_free, _ = guided_x0_eps(d, eps_model, x, t, t, grad, clip=False)
    # unclipped, a unit gradient moves x0_hat by ~+2e4 (float32 cancellation in x_t -
    # sqrt(1 - alpha_bar) eps adds noise of the same order)
    assert np.abs(x0_free.numpy()).min() > 1e3


@pytest.mark.parametrize("sampler,steps", [("ddim", 50), ("ddpm", 100), ("dpm_solver", 20)])
def test_exact_classifier_turns_mixture_into_class_conditional(sampler, steps):
    d, eps = _diffusion(), mixture_eps(_diffusion())
    labels = tf.Variable(np.ones(N, np.int32))  # read at run time: one trace for both labels
    scale = tf.Variable(1.0)
    cond_fn = classifier_cond_fn(class_logits(d), labels, scale)
    for y in (1, 0):
        labels.assign(np.full(N, y, np.int32))
        out = sample(d, eps, (N, 2), sampler=sampler, steps=steps, seed=3, cond_fn=cond_fn,
                     clip_denoised=False).numpy()
        side = np.mean((out @ (MEANS[y] - MEANS[1 - y])) > 0)
        assert side >= 0.99, (sampler, y, side)
        np.testing.assert_allclose(out.mean(0), MEANS[y], atol=0.03)
    plain = sample(d, eps, (N, 2), sampler=sampler, steps=steps, seed=3,
                   clip_denoised=False).numpy()
    assert abs(np.mean(plain.sum(1) > 0) - 0.5) < 0.05  # unguided: both classes


def test_larger_scale_sharpens():
    d, eps = _diffusion(), mixture_eps(_diffusion())
    labels, scale = np.ones(N, np.int32), tf.Variable(1.0)
    cond_fn = classifier_cond_fn(class_logits(d), labels, scale)
    stds = []
    for s in (1.0, 3.0):
        scale.assign(s)
        out = sample(d, eps, (N, 2), sampler="ddim", steps=50, seed=3, cond_fn=cond_fn,
                     clip_denoised=False).numpy()
        stds.append(out.std())
    assert stds[1] < 0.9 * stds[0]  # p(y|x)^s concentrates on the confident region


# ----------------------------------------------------------------------------- the classifier

TINY = {
    "run": {"seed": 1},
    "model": {"image_size": 8, "in_channels": 1, "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
              "attn_resolutions": [4], "num_groups": 4, "num_classes": 10},
    "diffusion": {"timesteps": 100},
    "training": {"batch_size": 16, "lr": 2e-3},
    "data": {"source": "digits", "use_labels": True},
}


@pytest.mark.keras2  # model code: also under Keras 2 (tf_keras)
def test_classifier_is_the_unet_encoder_with_a_pooling_head():
    cfg = config_from_dict(TINY)
    names = [p.spec.name for p in C.encoder_plans(cfg.model)]
    assert names[0] == "embed" and names[-1] == "mid_res1" and "out" not in names
    assert not any(n.startswith("up") for n in names)
    model = C.build_classifier_model(cfg.model, 10)
    unet = build_unet(C.encoder_config(cfg.model))
    for name in names:  # same blocks, same layer code: same parameter counts
        assert model.get_layer(name).count_params() == unet.block_params(name), name
    x, t = tf.zeros([3, 8, 8, 1]), tf.constant([0, 50, 99])
    assert model({"x_t": x, "t": t, "key": tf.zeros_like(t)}).shape == (3, 10)


def test_train_save_load_round_trip(tmp_path):
    cfg = config_from_dict(TINY)
    record = train_classifier(cfg, str(tmp_path), steps=3, verbose=False)
    assert set(record["heldout_accuracy_at_t"]) == {"0", "10", "25", "50", "75"}
    assert all(0.0 <= v <= 1.0 for v in record["heldout_accuracy_at_t"].values())
    saved = json.load(open(os.path.join(tmp_path, C.RECORD_FILE)))
    assert saved["model"]["ch"] == 8 and saved["diffusion"]["timesteps"] == 100
    clf = C.load_classifier(str(tmp_path))
    x, t = tf.random.stateless_normal([4, 8, 8, 1], [2, 2]), tf.constant([0, 10, 20, 99])
    again = C.load_classifier(str(tmp_path))
    np.testing.assert_allclose(clf.logits_fn(x, t).numpy(), again.logits_fn(x, t).numpy())
    clf.check_compatible(cfg)
    with pytest.raises(GuidanceError, match="diffusion.timesteps"):
        clf.check_compatible(config_from_dict(TINY, ["diffusion.timesteps=200"]))
    with pytest.raises(GuidanceError, match="holds no classifier.json"):
        C.load_classifier(str(tmp_path / "missing"))


def test_classifier_needs_classes():
    with pytest.raises(GuidanceError, match="model.num_classes"):
        train_classifier(config_from_dict(TINY, ["model.num_classes=0", "data.use_labels=false"]),
                           "/nonexistent", steps=1, verbose=False)
