"""Partitioning: cuts/blocks_per_stage/auto balance, liveness at each boundary, config errors."""
from __future__ import annotations

import itertools
import random

import pytest

from ipu_diffusion.config import ConfigError, ModelConfig, PipelineConfig, config_from_dict
from ipu_diffusion.models.carry import BlockSpec
from ipu_diffusion.models.plan import block_flops, plan_unet
from ipu_diffusion.pipeline.partition import balance, make_partition, summary_table
from pipeline_fakes import (FRONT, FRONT_Y, LOSS, brute_force_crossing, extra_shapes,
                            fake_blocks, plan_info)

CIFAR = ModelConfig()  # the DDPM CIFAR-10 U-Net (Ho et al. 2020)
SMALL = ModelConfig(image_size=8, in_channels=2, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(4,), num_groups=4)


def _all_cut_sets(names, stages, limit=60):
    combos = list(itertools.combinations(names[1:], stages - 1))
    random.Random(0).shuffle(combos)
    return combos[:limit]


@pytest.mark.parametrize("blocks,front,final", [
    (fake_blocks(), FRONT, ("loss",)),
    (fake_blocks(num_classes=3), FRONT_Y, ("loss", "t")),
    ([p.spec for p in plan_unet(CIFAR)], FRONT, ("loss",)),
    ([p.spec for p in plan_unet(SMALL)], FRONT, ("loss", "t")),
])
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_boundaries_are_exactly_the_live_keys(blocks, front, final, stages):
    names = [b.name for b in blocks]
    for cuts in _all_cut_sets(names, stages):
        part = make_partition(blocks, PipelineConfig(stages=stages, cuts=cuts), front, LOSS,
                              final_outputs=final)
        chain = part.chain
        assert part.boundary[0] == brute_force_crossing(chain, 0, final)
        for s in range(1, stages):
            start = part.chain_range(s)[0]
            assert chain[start].name == cuts[s - 1]
            assert part.inputs(s) == brute_force_crossing(chain, start, final), (cuts, s)
            assert part.sends(s - 1) == part.inputs(s)
        assert part.sends(stages - 1) == tuple(final)


def test_skip_rides_through_middle_stages():
    blocks = fake_blocks()
    part = make_partition(blocks, PipelineConfig(stages=4, cuts=("res0", "down", "up")),
                          FRONT, LOSS)
    # skip_a: written by in_conv (stage 0), read by up0 (stage 3)
    assert all("skip_a" in part.inputs(s) for s in (1, 2, 3))
    # skip_b: written by res1 (stage 2), read by up (stage 3); not sent before it exists
    assert "skip_b" not in part.inputs(2) and "skip_b" in part.inputs(3)
    # the batch enters stage 0 only; x0 rides to the loss, key stops after the last dropout
    assert part.batch_keys == ("key", "x0")
    assert "x0" in part.inputs(3) and "key" not in part.inputs(3)
    assert part.differentiable(part.inputs(3)) == ("emb", "h", "skip_a", "skip_b")


def test_blocks_per_stage_and_cuts_agree():
    blocks = fake_blocks()
    a = make_partition(blocks, PipelineConfig(stages=3, blocks_per_stage=(2, 4, 3)), FRONT, LOSS)
    b = make_partition(blocks, PipelineConfig(stages=3, cuts=("res0", "up")), FRONT, LOSS)
    assert a.ranges == b.ranges == ((0, 2), (2, 6), (6, 9))
    assert a.boundary == b.boundary
    assert a.stage_blocks(1) == ("res0", "down", "res1", "mid")
    assert a.device_mapping == (0, 1, 2)


def _brute_force_balance(costs, stages):
    best = float("inf")
    for cut in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = (0,) + cut + (len(costs),)
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_balance_is_optimal(seed):
    r = random.Random(seed)
    costs = [r.choice([0, 1, 5, 20, 100]) * r.random() for _ in range(r.randint(4, 10))]
    for stages in range(1, min(len(costs), 5) + 1):
        ranges = balance(costs, stages)
        assert [a for a, _ in ranges][0] == 0 and ranges[-1][1] == len(costs)
        assert all(a < b for a, b in ranges) and all(r1[1] == r2[0] for r1, r2 in zip(ranges, ranges[1:]))
        got = max(sum(costs[a:b]) for a, b in ranges)
        assert got == pytest.approx(_brute_force_balance(costs, stages))


def test_balance_respects_fits_veto():
    costs = [1.0] * 8
    assert balance(costs, 2) == [(0, 4), (4, 8)]
    # stage 1 may hold at most 2 blocks -> the best allowed split
    assert balance(costs, 2, fits=lambda s, i, j: s == 0 or j - i <= 2) == [(0, 6), (6, 8)]
    with pytest.raises(ConfigError, match="pipeline.stages"):
        balance(costs, 2, fits=lambda s, i, j: j - i <= 3)


def test_auto_balance_on_the_cifar_unet_by_flops():
    plans = plan_unet(CIFAR)
    costs = [block_flops(CIFAR, p) for p in plans]
    part = make_partition([p.spec for p in plans], PipelineConfig(stages=4), FRONT, LOSS, costs)
    per_stage = [sum(costs[a:b]) for a, b in part.ranges]
    assert max(per_stage) == pytest.approx(_brute_force_balance(costs, 4))
    assert max(per_stage) < 0.4 * sum(costs)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("pipeline,key,fragment", [
    (PipelineConfig(stages=2, cuts=("nope",)), "pipeline.cuts", "blocks are: embed, in_conv"),
    (PipelineConfig(stages=3, cuts=("res1", "res0")), "pipeline.cuts", "increasing order"),
    (PipelineConfig(stages=3, cuts=("res0", "res0")), "pipeline.cuts", "empty"),
    (PipelineConfig(stages=2, cuts=("embed",)), "pipeline.cuts", "empty first stage"),
    (PipelineConfig(stages=3, blocks_per_stage=(3, 0, 6)), "pipeline.blocks_per_stage", "empty stage"),
    (PipelineConfig(stages=2, blocks_per_stage=(3, 4)), "pipeline.blocks_per_stage", "sums to 7"),
    (PipelineConfig(stages=2, blocks_per_stage=(9,)), "pipeline.blocks_per_stage", "1 entries"),
    (PipelineConfig(stages=10), "pipeline.stages", "only 9 blocks"),
    (PipelineConfig(stages=2, device_mapping=(0,)), "pipeline.device_mapping", "1 entries"),
    (PipelineConfig(stages=2, cuts=("res0", "up")), "pipeline.cuts", "3 stages"),
])
def test_config_errors_name_the_key(pipeline, key, fragment):
    with pytest.raises(ConfigError) as e:
        make_partition(fake_blocks(), pipeline, FRONT, LOSS, [1.0] * 9)
    assert key in str(e.value) and fragment in str(e.value), str(e.value)


def test_config_file_level_errors():
    with pytest.raises(ConfigError, match="pipeline.device_mapping"):
        config_from_dict({"pipeline": {"stages": 2, "device_mapping": [0, 1, 2]}})
    cfg = config_from_dict({"pipeline": {"stages": 2, "cuts": ["mid_attn_typo"]}})
    with pytest.raises(ConfigError, match="unknown block 'mid_attn_typo'.*mid_attn"):
        make_partition([p.spec for p in plan_unet(cfg.model)], cfg.pipeline, FRONT, LOSS)


def test_final_output_must_be_produced():
    with pytest.raises(ValueError, match="written by no block"):
        make_partition(fake_blocks(), PipelineConfig(), FRONT, LOSS, final_outputs=("loss", "zz"))
    dup = fake_blocks() + [BlockSpec("out", ("out",), ("out",))]
    with pytest.raises(ValueError, match="unique"):
        make_partition(dup, PipelineConfig(), FRONT, LOSS)


# --------------------------------------------------------------------------- summary


def test_summary_table_lists_every_stage():
    part = make_partition([p.spec for p in plan_unet(CIFAR)],
                          PipelineConfig(stages=4, cuts=("down1_res0", "mid_res0", "up1_res0")),
                          FRONT, LOSS)
    text = summary_table(part, plan_info(CIFAR), micro_batch=4, extra_shapes=extra_shapes(CIFAR),
                         microbatches=8)
    lines = text.splitlines()
    assert len(lines) == 2 + 4
    assert "embed..down0_down" in lines[2] and "up1_res0..out" in lines[5]
    # stage 0 sends x0, x_t, noise (3 x 32x32x3), t, key, emb [512] and skips 0..3
    sent = 4 * 4 * (3 * 3072 + 2 + 512 + 3 * 32 * 32 * 128 + 16 * 16 * 128)
    assert f"{sent:,}" in lines[2]
    assert lines[5].rstrip().endswith("loss")


# A section that is wrong whatever the model: the same error from loading a config and
# from partitioning (the check is written once, in config.py).
BAD_SECTIONS = [
    ({"stages": 0}, "pipeline.stages: 0 must be > 0"),
    ({"stages": 2, "microbatches": 0}, "pipeline.microbatches: 0 must be > 0"),
    ({"stages": 2, "cuts": ["a"], "blocks_per_stage": [1, 1]},
     "pipeline: give either cuts or blocks_per_stage, not both"),
    ({"stages": 3, "cuts": ["a"]}, "pipeline.cuts: 1 cut(s) make 2 stages but pipeline.stages is 3"),
    ({"stages": 2, "blocks_per_stage": [3, 0]}, "pipeline.blocks_per_stage: [3, 0] has an empty stage"),
    ({"stages": 2, "blocks_per_stage": [3]}, "pipeline.blocks_per_stage: [3] has 1 entries"),
    ({"stages": 2, "device_mapping": [0]}, "pipeline.device_mapping: [0] has 1 entries"),
    ({"stages": 2, "device_mapping": [0, -1]}, "pipeline.device_mapping: [0, -1] has a negative device"),
]


@pytest.mark.parametrize("section, message", BAD_SECTIONS)
def test_partition_and_config_give_the_same_pipeline_error(section, message):
    with pytest.raises(ConfigError) as from_config:
        config_from_dict({"pipeline": section, "training": {"batch_size": 8}})
    pipeline = PipelineConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in section.items()})
    with pytest.raises(ConfigError) as from_partition:
        make_partition(fake_blocks(), pipeline, FRONT, LOSS)
    assert str(from_config.value).startswith(message)
    assert str(from_partition.value) == str(from_config.value)
