"""The U-Net over a carry: stage models reproduce the whole model exactly for any cut,
dropout is keyed per example, conditioning reaches the output, weights round-trip."""
from __future__ import annotations

import numpy as np
import pytest

from ipu_diffusion.config import ModelConfig
from ipu_diffusion.models.carry import stage_ranges
from ipu_diffusion.models.unet import build_unet

pytestmark = pytest.mark.keras2

BASE = dict(image_size=8, in_channels=2, ch=8, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(4,), num_heads=2, dropout=0.3, num_groups=4)
# Every option switched away from the DDPM default at once.
VARIANT = dict(BASE, attn_resolutions=(8, 4), num_head_channels=4, use_scale_shift_norm=True,
               resblock_updown=True, resamp_with_conv=False, learn_sigma=True, num_classes=3)


@pytest.fixture(scope="module")
def unet():
    return build_unet(ModelConfig(**BASE), zero_init=False)


@pytest.fixture(scope="module")
def variant():
    return build_unet(ModelConfig(**VARIANT), zero_init=False)


def _inputs(u, batch=3, seed=0):
    r = np.random.RandomState(seed)
    c = u.config
    carry = {"x_t": r.randn(batch, c.image_size, c.image_size, c.in_channels).astype("float32"),
             "t": r.randint(0, 1000, size=batch).astype("int32"),
             "key": r.randint(-2 ** 31, 2 ** 31 - 1, size=batch).astype("int32")}
    if c.num_classes:
        carry["y"] = r.randint(0, c.num_classes + 1, size=batch).astype("int32")
    return carry


_STAGES = {}  # (config, cuts) -> (ranges, stage models): built once, run in both modes


def _run_stages(u, cuts, carry, training):
    ranges = stage_ranges(u.blocks, cuts)
    cache_key = (u.config, tuple(cuts))
    if cache_key not in _STAGES:
        _STAGES[cache_key] = u.stage_models_for_ranges(ranges)
    carry = dict(carry)
    for (start, stop), model in zip(ranges, _STAGES[cache_key]):
        out = model({k: carry[k] for k in u.live_keys(start)}, training=training)
        assert set(out) == set(u.live_keys(stop)), "a stage outputs exactly the live keys"
        carry.update({k: v.numpy() for k, v in out.items()})
    return carry[u.output_key]


def test_block_layout(unet):
    assert unet.block_names == [
        "embed", "in_conv", "down0_res0", "down0_down", "down1_res0", "mid_res0", "mid_attn",
        "mid_res1", "up1_res0", "up1_res1", "up1_up", "up0_res0", "up0_res1", "out"]
    assert unet.input_keys == ("x_t", "t", "key")
    assert unet.output_key == "out" and unet.out_channels == 2
    by_name = {b.name: b for b in unet.blocks}
    assert by_name["up1_res0"].inputs == ("h", "skip_3", "emb", "key")  # last skip first
    assert by_name["up0_res1"].inputs == ("h", "skip_0", "emb", "key")
    assert unet.live_keys(len(unet.blocks)) == ("out",)


CUTS = {
    "embed": ["in_conv"],                    # right after embed: emb (+ key, x_t) crosses
    "skips": ["down1_res0", "up1_res1"],     # skips made in stage 0 are consumed in stage 2
    "each": None,                            # one block per stage: every possible boundary
}
CASES = [("unet", name) for name in CUTS] + [("variant", "skips"), ("variant", "each")]


@pytest.mark.parametrize("which, cuts", CASES, ids=["-".join(c) for c in CASES])
@pytest.mark.parametrize("training", [False, True], ids=["infer", "train"])
def test_stages_equal_whole_model(request, which, cuts, training):
    u = request.getfixturevalue(which)
    cuts = CUTS[cuts] or u.block_names[1:]
    carry = _inputs(u)
    whole = u.keras_model({k: carry[k] for k in u.input_keys}, training=training).numpy()
    staged = _run_stages(u, cuts, carry, training)
    np.testing.assert_allclose(staged, whole, rtol=0, atol=1e-6)


def test_stages_share_the_whole_models_variables(unet):
    whole = {id(v) for v in unet.keras_model.trainable_variables}
    stages = unet.stage_models(["down1_res0", "mid_res1"])
    staged = [id(v) for m in stages for v in m.trainable_variables]
    assert len(staged) == len(set(staged)) == len(whole) and set(staged) == whole


def test_stage_outputs_match_boundary_shapes(unet):
    carry = _inputs(unet, batch=2)
    ranges = stage_ranges(unet.blocks, unet.block_names[1:])
    for (start, stop), model in zip(ranges, unet.stage_models_for_ranges(ranges)):
        out = model({k: carry[k] for k in unet.live_keys(start)})
        carry.update({k: v.numpy() for k, v in out.items()})
        for k, shape in unet.boundary_shapes(stop).items():
            assert carry[k].shape == (2,) + shape, (unet.block_names[start], k)


def test_block_info(unet):
    info = unet.block_info()
    assert [i["name"] for i in info] == unet.block_names
    assert sum(i["params"] for i in info) == unet.count_params()
    assert all(i["flops"] > 0 for i in info)
    assert info[-1]["output_shapes"] == {"out": (8, 8, 2)}
    assert info[0]["output_shapes"] == {"emb": (32,)}
    assert unet.input_shapes() == {"x_t": (8, 8, 2), "t": (), "key": ()}
    # in_conv: 2 * 8*8 positions * 3*3*2 inputs * 8 outputs (closed form)
    assert info[1]["flops"] == 2 * 64 * 9 * 2 * 8


def test_dropout_keyed_per_example(unet):
    c = _inputs(unet, batch=4)
    run = lambda key, training=True: unet(c["x_t"], c["t"], key=key, training=training).numpy()
    a = run(c["key"])
    np.testing.assert_array_equal(a, run(c["key"]))                  # same keys, same masks
    other = c["key"] + 1
    assert np.all(np.abs(a - run(other)).reshape(4, -1).max(axis=1) > 1e-4)  # per example
    mixed = np.concatenate([c["key"][:2], other[2:]])                 # masks follow the key,
    np.testing.assert_allclose(run(mixed)[:2], a[:2], atol=1e-6)      # not the batch position
    np.testing.assert_array_equal(run(c["key"], False), run(other, False))  # off at inference


def test_microbatches_reproduce_the_batch(unet):
    c = _inputs(unet, batch=4)
    full = unet(c["x_t"], c["t"], key=c["key"], training=True).numpy()
    parts = [unet(c["x_t"][i:i + 2], c["t"][i:i + 2], key=c["key"][i:i + 2], training=True).numpy()
             for i in (0, 2)]
    # float32 round-off only: Eigen's convolutions (oneDNN off, AVX2-only CPUs) block by
    # batch size and differ by ~1e-6 relative; a leak across examples is O(1e-1)
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=2e-5, atol=2e-6)


def test_output_depends_on_t(unet):
    c = _inputs(unet, batch=2)
    a = unet(c["x_t"], np.array([3, 3]), key=c["key"]).numpy()
    b = unet(c["x_t"], np.array([700, 700]), key=c["key"]).numpy()
    assert np.abs(a - b).max() > 1e-3


def test_output_depends_on_label(variant):
    c = _inputs(variant, batch=2)
    out = {y: variant(c["x_t"], c["t"], y=np.array([y, y])).numpy() for y in range(4)}
    assert out[0].shape == (2, 8, 8, 4)  # learned variance: 2 * in_channels
    for y in (1, 2, 3):  # 3 is the null label of classifier-free guidance
        assert np.abs(out[y] - out[0]).max() > 1e-3


def test_label_argument_checked(unet, variant):
    c = _inputs(unet, batch=2)
    with pytest.raises(ValueError, match="class-conditional"):
        variant(c["x_t"], c["t"])
    with pytest.raises(ValueError, match="unconditional"):
        unet(c["x_t"], c["t"], y=np.array([0, 1]))


def test_zero_init_starts_at_zero():
    # default initialisation: the last conv of every block is zero, so the output is too
    u = build_unet(ModelConfig(**dict(BASE, image_size=4, ch_mult=(1,), dropout=0.0)))
    c = _inputs(u, batch=2)
    np.testing.assert_array_equal(u(c["x_t"], c["t"]).numpy(), 0.0)


def test_save_load_round_trip(variant, tmp_path):
    u = variant  # every optional weight: label embedding, scale-shift projections, heads
    c = _inputs(u, batch=2)
    y = c.get("y")
    path = str(tmp_path / "unet.weights.h5")
    u.save_weights(path)
    fresh = build_unet(u.config, zero_init=False)
    before = fresh(c["x_t"], c["t"], y=y, key=c["key"], training=True).numpy()
    want = u(c["x_t"], c["t"], y=y, key=c["key"], training=True).numpy()
    assert np.abs(before - want).max() > 1e-4  # a different random initialisation
    fresh.load_weights(path)
    got = fresh(c["x_t"], c["t"], y=y, key=c["key"], training=True).numpy()
    np.testing.assert_array_equal(got, want)
