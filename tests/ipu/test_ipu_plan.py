"""ipu_plan: values worked out by hand for each shipped config, and one ConfigError per
invalid combination. Pure: no TensorFlow, no SDK (see test_ipu_plan_memory.py for the
memory check, which needs the U-Net's parameter counts)."""
from __future__ import annotations

import os
import re

import pytest

from ipu_diffusion.config import ConfigError, load_config
from ipu_diffusion.pipeline.ipu_plan import (TILE_BYTES, describe, ipu_plan, is_pow2,
                                             next_pow2, per_ipu)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MK2_BYTES = 1472 * 624 * 1024  # 940,572,672 B = 897 MiB, "about 900 MB" per GC200 IPU


def config_path(name: str) -> str:
    return os.path.join(ROOT, "pipeline_configs", name)


def load(name: str, *overrides: str):
    path = config_path(name)
    if not os.path.exists(path):
        pytest.skip(f"pipeline_configs/{name} is not in the checkout yet")
    return load_config(path, list(overrides))


def digits(*overrides: str):
    """digits.yaml: B = 64, T = 1000, steps 3000, log_every 100, 1 stage, M = 1."""
    return load("digits.yaml", *overrides)


# --------------------------------------------------------------------------- helpers


def test_ipu_next_pow2_and_is_pow2():
    assert [next_pow2(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    assert [is_pow2(n) for n in (1, 2, 3, 6, 64)] == [True, True, False, False, True]


def test_ipu_per_ipu_adds_up_shared_stages():
    # stages 0,1 on IPU 0 (10 + 20), stage 2 on IPU 1 (5), stage 3 on IPU 0 (1)
    assert per_ipu((0, 0, 1, 0), (10, 20, 5, 1)) == (31, 5)


# --------------------------------------------------------------------------- shipped configs


def test_ipu_plan_digits():
    plan = ipu_plan(digits())
    # one stage, default mapping (0,): K = next_pow2(0 + 1) = 1 IPU per replica, R = 1
    assert (plan.num_stages, plan.device_mapping, plan.pipelined) == (1, (0,), False)
    assert (plan.ipus_per_replica, plan.replicas, plan.total_ipus) == (1, 1, 1)
    # B = 64 = b x M x R = b x 1 x 1  ->  b = 64
    assert (plan.global_batch, plan.microbatches, plan.micro_batch) == (64, 1, 64)
    assert plan.gradient_accumulation_steps_per_replica == 1
    # ipu.steps_per_execution 0: k = M ceil(2 S / M) = 1 x ceil(2 / 1) = 2 -> 2 updates
    # per execution; 3000 steps and log_every 100 are multiples of 2
    assert (plan.steps_per_execution, plan.updates_per_execution) == (2, 2)
    assert (plan.schedule, plan.allow_recompute, plan.recomputation_mode) == ("Grouped", False, "Auto")
    # float32: no half precision, float partials, no loss scale, no stochastic rounding
    assert (plan.half_precision, plan.compute_dtype, plan.partials_type) == (False, "float32", "float")
    assert (plan.loss_scale, plan.stochastic_rounding) == (1.0, False)
    # hardware ipu2: 1472 tiles x 624 KiB
    assert (plan.ipu_model, plan.tiles_per_ipu, plan.memory_budget) == (False, 1472, MK2_BYTES)
    assert plan.available_memory_proportion == () and plan.notes == ()


def test_ipu_plan_digits_2stage():
    # stages 2, cuts [up1_res1], M 4, interleaved, no recompute, mapping [0, 1], R 1, B 64
    plan = ipu_plan(load("digits_2stage.yaml"))
    # IPUs 0..1: K = next_pow2(1 + 1) = 2 per replica, x 1 replica = 2
    assert (plan.num_stages, plan.device_mapping, plan.pipelined) == (2, (0, 1), True)
    assert (plan.ipus_per_replica, plan.total_ipus) == (2, 2)
    # b = 64 / (4 x 1) = 16
    assert (plan.global_batch, plan.microbatches, plan.micro_batch) == (64, 4, 16)
    # k = 4 ceil(2 x 2 / 4) = 4: one update per execution
    assert (plan.steps_per_execution, plan.updates_per_execution) == (4, 1)
    assert (plan.schedule, plan.allow_recompute, plan.recomputation_mode) == ("Interleaved", False, "Auto")
    assert (plan.half_precision, plan.partials_type, plan.loss_scale) == (False, "float", 1.0)
    assert plan.notes == ()  # interleaved needs M >= S = 2: 4 is enough


def test_ipu_plan_digits_4stage_grouped():
    # stages 4, blocks_per_stage [10, 4, 2, 3], M 8, grouped, recompute, R 1, B 64
    cfg = load("digits_4stage_grouped.yaml")
    plan = ipu_plan(cfg)
    # default mapping (0, 1, 2, 3): K = next_pow2(3 + 1) = 4 IPUs
    assert (plan.num_stages, plan.device_mapping, plan.total_ipus) == (4, (0, 1, 2, 3), 4)
    # b = 64 / (8 x 1) = 8
    assert (plan.global_batch, plan.microbatches, plan.micro_batch) == (64, 8, 8)
    # k = 8 ceil(2 x 4 / 8) = 8: one update per execution
    assert (plan.steps_per_execution, plan.updates_per_execution) == (8, 1)
    assert (plan.schedule, plan.allow_recompute, plan.recomputation_mode) == ("Grouped", True, "Auto")
    assert plan.notes == ()  # M = 8 = 2 S fills the grouped pipeline
    # with the partition: cumulative sums of [10, 4, 2, 3] over the 19 blocks
    plan = ipu_plan(cfg, _partition(cfg))
    assert plan.stage_ranges == ((0, 10), (10, 14), (14, 16), (16, 19))


def test_ipu_plan_cifar10_ddpm_4ipu():
    # stages 4, cuts [up3_res1, up1_res1, up0_res0], M 16, grouped, recompute,
    # mapping [0, 1, 2, 3], R 1, B 128, steps 800000, log_every 100
    plan = ipu_plan(load("cifar10_ddpm_4ipu.yaml"))
    assert (plan.ipus_per_replica, plan.replicas, plan.total_ipus) == (4, 1, 4)
    # b = 128 / (16 x 1) = 8
    assert (plan.global_batch, plan.microbatches, plan.micro_batch) == (128, 16, 8)
    # k = 16 ceil(8 / 16) = 16: one update per execution
    assert (plan.steps_per_execution, plan.updates_per_execution) == (16, 1)
    assert (plan.schedule, plan.allow_recompute, plan.recomputation_mode) == ("Grouped", True, "Auto")
    assert (plan.half_precision, plan.ipu_model, plan.memory_budget) == (False, False, MK2_BYTES)
    assert plan.notes == ()


def test_ipu_plan_cifar10_iddpm_8ipu():
    # stages 8 (7 cuts), M 16, grouped, recompute, default mapping, R 1, B 128,
    # steps 500000, log_every 100, uniform timestep sampler
    plan = ipu_plan(load("cifar10_iddpm_8ipu.yaml"))
    # mapping 0..7: K = next_pow2(7 + 1) = 8
    assert (plan.device_mapping, plan.ipus_per_replica, plan.total_ipus) == (tuple(range(8)), 8, 8)
    # b = 128 / 16 = 8; k = 16 ceil(16 / 16) = 16: one update per execution
    assert (plan.micro_batch, plan.steps_per_execution, plan.updates_per_execution) == (8, 16, 1)
    assert (plan.schedule, plan.allow_recompute) == ("Grouped", True)
    assert plan.notes == ()  # M = 16 = 2 S


def test_ipu_plan_cifar10_ddpm_4ipu_on_two_replicas():
    # the config's note: 2 replicas on 8 IPUs keep micro-batch 8 with B 256 or M 8
    plan = ipu_plan(load("cifar10_ddpm_4ipu.yaml", "ipu.replicas=2"))
    assert (plan.total_ipus, plan.micro_batch) == (8, 4)  # b = 128 / (16 x 2) = 4
    plan = ipu_plan(load("cifar10_ddpm_4ipu.yaml", "ipu.replicas=2", "training.batch_size=256"))
    # 4 IPUs x 2 replicas = 8; b = 256 / (16 x 2) = 8
    assert (plan.total_ipus, plan.micro_batch) == (8, 8)
    plan = ipu_plan(load("cifar10_ddpm_4ipu.yaml", "ipu.replicas=2", "pipeline.microbatches=8"))
    # b = 128 / (8 x 2) = 8; k = 8 ceil(8 / 8) = 8
    assert (plan.total_ipus, plan.micro_batch, plan.steps_per_execution) == (8, 8, 8)


def _partition(cfg):
    """The partition from the block plan alone (models/plan.py: no Keras layers built)."""
    from ipu_diffusion.models.plan import plan_unet
    from ipu_diffusion.pipeline.partition import make_partition
    from ipu_diffusion.training.objective import DiffusionObjective

    objective = DiffusionObjective(cfg.diffusion)
    blocks = [p.spec for p in plan_unet(cfg.model)]
    return make_partition(blocks, cfg.pipeline, objective.front_spec, objective.loss_spec)


# --------------------------------------------------------------------------- invalid combos


def raises(match: str, cfg, **kwargs):
    with pytest.raises(ConfigError, match=match) as info:
        ipu_plan(cfg, **kwargs)
    return str(info.value)


FOUR = ("pipeline.stages=4", "pipeline.microbatches=8")


def test_ipu_more_stages_than_ipus_without_mapping():
    # 32 replicas on a 64-IPU system leave 2 IPUs per replica for 4 stages
    msg = raises(r"pipeline\.stages", digits(*FOUR, "ipu.replicas=32", "training.batch_size=256"))
    assert "ipu.replicas" in msg and "pipeline.device_mapping" in msg
    # on a 4-IPU system one replica fits; an 8-stage pipeline does not
    raises(r"pipeline\.stages", digits("pipeline.stages=8", "pipeline.microbatches=16"),
           system_ipus=4)


def test_ipu_device_mapping_beyond_ipu_count():
    # 32 replicas x IPUs 0..3 = 128 > 64: the mapping's IPU 3 is beyond 0..1
    msg = raises(r"pipeline\.device_mapping", digits(*FOUR, "pipeline.device_mapping=[0,1,2,3]",
                                                    "ipu.replicas=32", "training.batch_size=256"))
    assert "IPUs 0..3, so 4 IPUs per replica" in msg and "ipu.replicas 32" in msg


def test_ipu_device_mapping_may_share_ipus():
    # 4 stages on IPUs (0, 0, 1, 1): K = 2 per replica, x 32 replicas = 64 IPUs: fits
    plan = ipu_plan(digits(*FOUR, "pipeline.device_mapping=[0,0,1,1]", "ipu.replicas=32",
                           "training.batch_size=256"))
    assert (plan.ipus_per_replica, plan.total_ipus, plan.micro_batch) == (2, 64, 1)


def test_ipu_three_ipus_round_up_to_four():
    plan = ipu_plan(digits("pipeline.stages=3", "pipeline.microbatches=6",
                           "training.batch_size=60"))
    assert (plan.ipus_per_replica, plan.total_ipus) == (4, 4)  # IPU 3 idle


def test_ipu_device_mapping_with_unused_ipu():
    raises(r"pipeline\.device_mapping.*IPU\(s\) \[1\]",
           digits("pipeline.stages=2", "pipeline.microbatches=4", "pipeline.device_mapping=[0,2]"))


def test_ipu_replicas_power_of_two():
    raises(r"ipu\.replicas: 3", digits("ipu.replicas=3", "training.batch_size=63"))


def test_ipu_steps_per_execution_multiple_of_microbatches():
    raises(r"ipu\.steps_per_execution: 12 .*pipeline\.microbatches 8",
           digits(*FOUR, "ipu.steps_per_execution=12"))


def test_ipu_steps_and_log_every_multiple_of_updates_per_execution():
    # k = 24, M = 8: 3 updates per execution; log_every 100 is not a multiple of 3
    raises(r"training\.log_every: 100", digits(*FOUR, "ipu.steps_per_execution=24"))
    raises(r"training\.steps: 3001", digits(*FOUR, "training.steps=3001",
                                             "ipu.steps_per_execution=16"))


def test_ipu_default_steps_per_execution_rule():
    # S = 4: at least 2 S = 8 micro-batches; the smallest multiple of M above (M itself
    # is a multiple of the pipeline's overlap length: 1 sequential, S interleaved)
    for schedule, m, want in (("sequential", 1, 8), ("sequential", 3, 9), ("interleaved", 4, 8),
                              ("interleaved", 12, 12), ("grouped", 8, 8), ("grouped", 16, 16)):
        cfg = digits(*FOUR, f"pipeline.microbatches={m}", "training.batch_size=48",
                     f"pipeline.schedule={schedule}", "training.steps=3600",
                     "training.log_every=360")
        assert ipu_plan(cfg).steps_per_execution == want, m


def test_ipu_interleaved_needs_accumulation():
    raises(r"pipeline\.schedule: 'interleaved'.*pipeline\.microbatches",
           digits("pipeline.stages=2", "pipeline.schedule=interleaved", "pipeline.microbatches=1"))


def test_ipu_interleaved_cannot_share_an_ipu():
    raises(r"pipeline\.schedule: 'interleaved'.*device_mapping",
           digits(*FOUR, "pipeline.schedule=interleaved", "pipeline.device_mapping=[0,0,1,1]"))


def test_ipu_batch_arithmetic_must_divide():
    # B = 64 over M = 8 x R = 16 = 128 micro-batch slots
    msg = raises(r"training\.batch_size: the global batch 64",
                 digits(*FOUR, "pipeline.device_mapping=[0,0,0,0]", "ipu.replicas=16"))
    assert "pipeline.microbatches 8" in msg and "ipu.replicas 16" in msg


def test_ipu_recompute_interleaved_mode_with_interleaved_schedule():
    raises(r"ipu\.recomputation_mode.*pipeline\.schedule 'interleaved'",
           digits(*FOUR, "pipeline.schedule=interleaved", "pipeline.recompute=true",
                  "ipu.recomputation_mode=recompute_and_backpropagate_interleaved"))


def test_ipu_recompute_interleaved_mode_with_grouped_is_fine():
    plan = ipu_plan(digits(*FOUR, "pipeline.recompute=true",
                           "ipu.recomputation_mode=recompute_and_backpropagate_interleaved"))
    assert (plan.allow_recompute, plan.recomputation_mode) == (True, "RecomputeAndBackpropagateInterleaved")


def test_ipu_bfloat16_is_not_an_ipu_type():
    raises(r"training\.precision: 'mixed_bfloat16'", digits("training.precision=mixed_bfloat16"))


def test_ipu_half_partials_need_float16():
    raises(r"ipu\.partials_type: 'half'", digits("ipu.partials_type=half"))


def test_ipu_float16_plan():
    plan = ipu_plan(digits("training.precision=mixed_float16", "ipu.partials_type=half"))
    assert (plan.half_precision, plan.compute_dtype, plan.partials_type) == (True, "float16", "half")
    assert plan.stochastic_rounding and plan.loss_scale == 128.0


def test_ipu_tiles_only_for_the_emulator():
    raises(r"ipu\.tiles_per_ipu: 8", digits("ipu.tiles_per_ipu=8"))
    plan = ipu_plan(digits("ipu.ipu_model=true", "ipu.tiles_per_ipu=8"))
    # 8 emulated tiles x 624 KiB
    assert (plan.ipu_model, plan.tiles_per_ipu, plan.memory_budget) == (True, 8, 8 * TILE_BYTES)


def test_ipu_available_memory_proportion_range():
    raises(r"ipu\.available_memory_proportion: \[1\.5\]",
           digits("pipeline.stages=2", "pipeline.microbatches=4",
                  "ipu.available_memory_proportion=[0.6,1.5]"))
    plan = ipu_plan(digits("pipeline.stages=2", "pipeline.microbatches=4",
                           "ipu.available_memory_proportion=[0.6,0.3]"))
    assert plan.available_memory_proportion == (0.6, 0.3)


def test_ipu_loss_aware_sampler_rejected():
    raises(r"diffusion\.timestep_sampler: 'loss_aware'",
           digits("diffusion.timestep_sampler=loss_aware"))


def test_ipu_notes_for_ignored_keys():
    plan = ipu_plan(digits(*FOUR, "training.steps_per_execution=4"))
    assert "training.steps_per_execution is ignored" in " ".join(plan.notes)


def test_ipu_pipeline_depth_names_the_nearest_valid_values():
    # Grouped training of 4 stages: M a multiple of 2 S = 8 (pipeline_visitor.cc)
    raises(r"pipeline\.microbatches: 4 .* multiple of 8 \(at least 8\), e\.g\. 8 \(",
           digits(*FOUR, "pipeline.microbatches=4", "training.batch_size=48"))
    raises(r"pipeline\.microbatches: 12 .* e\.g\. 8 or 16 \(",
           digits(*FOUR, "pipeline.microbatches=12", "training.batch_size=48"))


def test_ipu_describe_table():
    text = describe(ipu_plan(digits(*FOUR, "pipeline.device_mapping=[0,0,1,1]",
                                    "ipu.available_memory_proportion=[0.5,0.5,0.4,0.4]")))
    assert "4 stage(s) on 2 IPU(s) per replica x 1 replica(s) = 2 IPUs" in text
    assert "global 64 = micro-batch 8 x 8 microbatches x 1 replica(s)" in text
    rows = [line.split() for line in text.splitlines() if re.match(r"^\s+\d+\s+\d+\s", line)]
    assert [(r[0], r[1], r[3]) for r in rows] == [("0", "0", "0.50"), ("1", "0", "0.50"),
                                                  ("2", "1", "0.40"), ("3", "1", "0.40")]
