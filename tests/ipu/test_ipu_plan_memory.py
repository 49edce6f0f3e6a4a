"""ipu_plan with the real U-Net's partition and block info: memory per IPU, and agreement
with the plain-TF executor on stages, microbatches and batch arithmetic."""
from __future__ import annotations

import os

import pytest
import tensorflow as tf
from ipu_testlib import ROOT, small_config

from ipu_diffusion import rng
from ipu_diffusion.config import ConfigError
from ipu_diffusion.pipeline.ipu_plan import carry_shapes, ipu_plan
from ipu_diffusion.pipeline.memory import MemorySpec, estimate_partition
from ipu_diffusion.pipeline.partition import partition_unet


@pytest.fixture()
def net(small_net):
    return small_net


def plan_for(net, *overrides: str):
    """The small digits U-Net (4 stages, M = 8, B = 64 unless overridden) and its plan."""
    cfg = small_config(*overrides)
    part = partition_unet(net.unet, cfg.pipeline, net.objective.front_spec, net.objective.loss_spec)
    return cfg, part, ipu_plan(cfg, part, net.info)


def test_ipu_memory_is_memory_py_ipu_backend(net):
    cfg, part, plan = plan_for(net)
    spec = MemorySpec(micro_batch=8, microbatches=8, schedule="grouped", backend="ipu")
    want = [m.total for m in estimate_partition(part, net.info, spec, carry_shapes(cfg))]
    assert list(plan.stage_bytes) == want
    assert plan.ipu_bytes == tuple(want)  # one stage per IPU
    assert plan.stage_ranges == part.ranges


def test_ipu_memory_stages_sharing_an_ipu_add_up(net):
    _, _, spread = plan_for(net)
    _, _, shared = plan_for(net, "pipeline.device_mapping=[0,0,1,1]")
    s = spread.stage_bytes
    assert shared.stage_bytes == s
    assert shared.ipu_bytes == (s[0] + s[1], s[2] + s[3])


def test_ipu_memory_offload_removes_adam_and_ema(net):
    _, part, plan = plan_for(net)
    _, _, off = plan_for(net, "ipu.offload_optimizer_state=true")
    for s, (start, stop) in enumerate(part.ranges):
        params = sum(int(i["params"]) for i in net.info[start:stop])
        # Adam's m and v plus the EMA copy: 3 float32 values per parameter
        assert plan.stage_bytes[s] - off.stage_bytes[s] == 3 * 4 * params


def test_ipu_memory_over_budget_on_hardware(net):
    # micro-batch 3072 / 8 = 384 with all four stages on one IPU: about 1.3 GiB > 897 MiB
    with pytest.raises(ConfigError, match=r"pipeline\.device_mapping.*IPU 0 \(stages 0, 1, 2, 3\)"):
        plan_for(net, "training.batch_size=3072", "pipeline.device_mapping=[0,0,0,0]")
    # spread over four IPUs, or with recomputation (only stage inputs stashed), it fits
    _, _, plan = plan_for(net, "training.batch_size=3072")
    assert max(plan.ipu_bytes) <= plan.memory_budget
    _, _, plan = plan_for(net, "training.batch_size=3072", "pipeline.recompute=true",
                          "pipeline.device_mapping=[0,0,0,0]")
    assert plan.ipu_bytes[0] <= plan.memory_budget


def test_ipu_memory_over_budget_on_emulator_is_a_note(net):
    _, _, plan = plan_for(net, "pipeline.device_mapping=[0,0,0,0]", "ipu.ipu_model=true",
                          "ipu.tiles_per_ipu=2")
    assert plan.ipu_bytes[0] > plan.memory_budget
    assert any("emulator runs anyway" in n for n in plan.notes)


@pytest.mark.parametrize("overrides", [["ipu.replicas=2"],
                                       ["pipeline.stages=2", "pipeline.microbatches=4"]])
def test_ipu_plan_agrees_with_fallback_executor(net, overrides):
    from ipu_diffusion.pipeline.fallback import build_executor

    # microbatch by microbatch, as the IPU runs them (not the CPU's fused microbatches)
    cfg, part, plan = plan_for(net, *overrides, "pipeline.fuse_microbatches=false")
    executor = build_executor(net.unet, net.objective, cfg.pipeline,
                              global_batch=cfg.training.batch_size, partition=part)
    assert executor.num_stages == plan.num_stages == cfg.pipeline.stages
    assert executor.microbatches == plan.gradient_accumulation_steps_per_replica
    assert executor.global_batch == plan.global_batch
    assert tuple(part.device_mapping) == plan.device_mapping
    n = plan.global_batch
    batch = {"x0": tf.zeros([n, 16, 16, 1]), "key": rng.example_keys(0, 0, tf.range(n)),
             "y": tf.zeros([n], tf.int32)}
    micro = executor.split(batch)
    # the CPU executor has no replicas: its microbatch holds R IPU micro-batches
    assert [int(m["x0"].shape[0]) for m in micro] == [plan.micro_batch * plan.replicas] * len(micro)
    assert len(micro) == plan.microbatches


@pytest.mark.parametrize("name, stages", [("cifar10_ddpm_4ipu.yaml", 4), ("cifar10_iddpm_8ipu.yaml", 8)])
def test_ipu_shipped_cifar10_configs_fit_their_ipus(name, stages):
    """The full-size U-Nets (35.7 M and 52.5 M parameters) cut as shipped: every IPU
    within 897 MiB by memory.py (the config comments quote the same estimates)."""
    from ipu_diffusion.config import load_config
    from ipu_diffusion.models.unet import build_unet
    from ipu_diffusion.training.objective import DiffusionObjective

    cfg = load_config(os.path.join(ROOT, "pipeline_configs", name))
    unet, objective = build_unet(cfg.model), DiffusionObjective(cfg.diffusion)
    part = partition_unet(unet, cfg.pipeline, objective.front_spec, objective.loss_spec)
    plan = ipu_plan(cfg, part, unet.block_info())
    assert len(plan.ipu_bytes) == stages
    assert max(plan.ipu_bytes) <= plan.memory_budget
    # the same stages all on one IPU do not fit
    one = load_config(os.path.join(ROOT, "pipeline_configs", name),
                      [f"pipeline.device_mapping={[0] * stages}"])
    part = partition_unet(unet, one.pipeline, objective.front_spec, objective.loss_spec)
    with pytest.raises(ConfigError, match=r"IPU 0 \(stages 0, 1, 2"):
        ipu_plan(one, part, unet.block_info())
