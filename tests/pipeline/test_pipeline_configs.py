"""The pipelined run configs load strictly, keep their source config's sections, and plan."""
from __future__ import annotations

import os

import pytest

from ipu_diffusion.config import load_config
from ipu_diffusion.models.plan import block_flops, plan_unet
from ipu_diffusion.pipeline.partition import make_partition, summary_table
from pipeline_fakes import extra_shapes, plan_info

from ipu_diffusion.models.carry import BlockSpec

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "pipeline_configs")
# the trainer's objective blocks (ipu_diffusion/training/objective.py); a class-conditional
# model's front also takes and passes on the labels y
LOSS = BlockSpec("loss", ("out", "x0", "x_t", "t", "noise", "weight"), ("loss",))


def _front(model):
    label = ("y",) if model.num_classes else ()
    return BlockSpec("front", ("x0", "key") + label, ("x_t", "t", "noise", "weight") + label)


CONFIGS = {  # ours -> (source config, stages, first blocks of stages 1..S-1)
    "digits_2stage.yaml": ("digits.yaml", 2, ("up1_res1",)),
    "digits_4stage_grouped.yaml": ("digits.yaml", 4, ("up2_res0", "up1_res1", "up0_res0")),
    "cifar10_ddpm_4ipu.yaml": ("ddpm_cifar10.yaml", 4, ("up3_res1", "up1_res1", "up0_res0")),
    "cifar10_iddpm_8ipu.yaml": ("iddpm_cifar10.yaml", 8, ("down1_res1", "mid_res0", "up2_res1",
                                                          "up1_res1", "up1_res3", "up0_res0",
                                                          "up0_res2")),
}


def _load(name):
    return load_config(os.path.join(ROOT, name))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_loads_and_plans(name):
    source, stages, firsts = CONFIGS[name]
    cfg, src = _load(name), _load(source)
    for section in ("model", "diffusion", "training", "data", "eval"):  # inherited via base:
        assert getattr(cfg, section) == getattr(src, section), f"{name}: {section} differs from {source}"
    assert cfg.pipeline.stages == stages
    assert cfg.training.batch_size % cfg.pipeline.microbatches == 0
    plans = plan_unet(cfg.model)
    costs = [block_flops(cfg.model, p) for p in plans]
    part = make_partition([p.spec for p in plans], cfg.pipeline, _front(cfg.model), LOSS, costs)
    assert tuple(part.stage_blocks(s)[0] for s in range(1, stages)) == firsts
    table = summary_table(part, plan_info(cfg.model), cfg.training.batch_size // cfg.pipeline.microbatches,
                          extra_shapes(cfg.model), cfg.pipeline.microbatches, cfg.pipeline.schedule,
                          cfg.pipeline.recompute, backend="ipu")
    assert len(table.splitlines()) == 2 + stages


def test_digits_4stage_blocks_per_stage_is_the_flop_balance():
    cfg = _load("digits_4stage_grouped.yaml")
    plans = plan_unet(cfg.model)
    pipeline = type(cfg.pipeline)(stages=4)  # neither cuts nor blocks_per_stage: automatic
    auto = make_partition([p.spec for p in plans], pipeline, _front(cfg.model), LOSS,
                          [block_flops(cfg.model, p) for p in plans])
    assert tuple(b - a for a, b in auto.ranges) == cfg.pipeline.blocks_per_stage


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_passes_the_ipu_plan(name):
    ipu_plan = pytest.importorskip("ipu_diffusion.pipeline.ipu_plan")
    cfg = _load(name)
    plans = plan_unet(cfg.model)
    part = make_partition([p.spec for p in plans], cfg.pipeline, _front(cfg.model), LOSS)
    plan = ipu_plan.ipu_plan(cfg, part)
    assert plan.num_stages == cfg.pipeline.stages and not plan.notes
