"""Presets: the DDPM CIFAR-10 network has exactly the reference parameter count, every
preset builds with the right output shape, and impossible geometries are ConfigErrors."""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

from ipu_diffusion.config import ConfigError, ModelConfig, load_config
from ipu_diffusion.models.unet import build_unet


CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "pipeline_configs")


def _preset(name, overrides=()):
    return load_config(os.path.join(CONFIGS, name + ".yaml"), overrides)


def closed_form_params(m: ModelConfig) -> int:
    """Parameter count written out from Ho et al. 2020 appendix B, independently of the
    builder: embedding MLP ch -> 4ch -> 4ch; ResBlock = GN(Cin) + conv3x3(Cin, Cout) +
    Dense(4ch, Cout or 2 Cout) + GN(Cout) + conv3x3(Cout, Cout) (+ 1x1 conv if Cin != Cout);
    attention = GN + qkv 1x1 (C -> 3C) + proj 1x1; conv resampling 3x3 (C, C); with K
    classes, a (K + 1) x 4ch label embedding (the null label included, no bias)."""
    e = 4 * m.ch
    conv = lambda a, b, k=3: k * k * a * b + b
    proj = 2 if m.use_scale_shift_norm else 1

    def res(a, b):
        return 2 * a + conv(a, b) + e * proj * b + proj * b + 2 * b + conv(b, b) + (conv(a, b, 1) if a != b else 0)

    attn = lambda c: 2 * c + conv(c, 3 * c, 1) + conv(c, c, 1)
    total = (m.ch * e + e) + (e * e + e) + conv(m.in_channels, m.ch)
    total += (m.num_classes + 1) * e if m.num_classes else 0
    skips, c, r = [m.ch], m.ch, m.image_size
    for level, mult in enumerate(m.ch_mult):
        for _ in range(m.num_res_blocks):
            total += res(c, m.ch * mult) + (attn(m.ch * mult) if r in m.attn_resolutions else 0)
            c = m.ch * mult
            skips.append(c)
        if level != len(m.ch_mult) - 1:
            total, r = total + conv(c, c), r // 2
            skips.append(c)
    total += 2 * res(c, c) + attn(c)
    for level in reversed(range(len(m.ch_mult))):
        for _ in range(m.num_res_blocks + 1):
            out = m.ch * m.ch_mult[level]
            total += res(c + skips.pop(), out) + (attn(out) if r in m.attn_resolutions else 0)
            c = out
        if level:
            total, r = total + conv(c, c), r * 2
    out_ch = m.in_channels * (2 if m.learn_sigma else 1)
    return total + 2 * c + conv(c, out_ch)


@pytest.mark.keras2  # the layers' parameter counts under tf_keras too
def test_ddpm_cifar10_has_the_reference_parameter_count():
    cfg = _preset("ddpm_cifar10")
    unet = build_unet(cfg.model)
    # Ho et al. 2020 report 35.7M; 35,746,307 is the count of their released network.
    assert unet.count_params() == 35_746_307
    assert closed_form_params(cfg.model) == 35_746_307
    assert sum(i["params"] for i in unet.block_info()) == 35_746_307
    out = unet(np.zeros((1, 32, 32, 3), np.float32), np.array([10]))
    assert out.shape == (1, 32, 32, 3) and out.dtype == "float32"


def test_iddpm_cifar10_counts_and_shape():
    cfg = _preset("iddpm_cifar10")
    assert closed_form_params(cfg.model) == 52_546_438
    # The architecture at a quarter of the width and one block per level builds fast and
    # checks the builder against the closed form with scale-shift norm, 4 heads at two
    # resolutions and a learned variance.
    narrow = _preset("iddpm_cifar10", ["model.ch=32", "model.num_res_blocks=1"]).model
    unet = build_unet(narrow)
    assert unet.count_params() == closed_form_params(narrow)
    assert unet.out_channels == 6
    out = unet(np.zeros((2, 32, 32, 3), np.float32), np.array([0, 3999]))
    assert out.shape == (2, 32, 32, 6)  # eps and the variance interpolant v (eq. 15)


def test_digits_preset_builds_small():
    cfg = _preset("digits")
    unet = build_unet(cfg.model)
    # diffusers' UNet2DModel of this shape with num_class_embeds=11 has 1,114,209
    # (benchmarks/diffusers_baseline.py prints its count); 1,112,801 without the labels
    assert unet.count_params() == closed_form_params(cfg.model) == 1_114_209
    assert build_unet(replace(cfg.model, num_classes=0)).count_params() == 1_112_801
    out = unet(np.zeros((2, 16, 16, 1), np.float32), np.array([1, 999]), np.array([3, 10]),
               training=True)
    assert out.shape == (2, 16, 16, 1)


SMALL = dict(image_size=16, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
             attn_resolutions=(8,), num_groups=8)


@pytest.mark.parametrize("change, key, words", [
    (dict(attn_resolutions=(4,)), "model.attn_resolutions", "16, 8"),
    (dict(ch_mult=(1, 2, 2, 2, 2, 2)), "model.ch_mult", "2**5"),
    (dict(image_size=12, ch_mult=(1, 2, 2, 2)), "model.ch_mult", "12"),
    (dict(num_groups=6), "model.num_groups", "16 channels"),
    (dict(ch=12, num_groups=8), "model.num_groups", "12 channels"),
    (dict(num_heads=3), "model.num_heads", "32 channels"),
    (dict(num_head_channels=5), "model.num_head_channels", "32 channels"),
])
def test_bad_geometry_is_a_config_error(change, key, words):
    with pytest.raises(ConfigError) as err:
        build_unet(ModelConfig(**dict(SMALL, **change)))
    assert key in str(err.value) and words in str(err.value)
