"""Training on Graphcore's IPUModel emulator; runs only where the Poplar SDK is installed.

The 4-stage digits pipeline is mapped onto one emulated IPU (``device_mapping [0,0,0,0]``)
with few tiles, as Graphcore's own Keras pipelining tests do (``tiles_per_ipu = 8``, more
when the plan's memory estimate needs it). Start pytest with
``TF_POPLAR_FLAGS=--use_ipu_model`` so Poplar never looks for hardware.
"""
from __future__ import annotations

import math
import os

import pytest

from ipu_diffusion.config import load_config
from ipu_diffusion.pipeline import ipu
from ipu_diffusion.training import ipu_train

pytestmark = pytest.mark.skipif(
    not ipu.sdk_available(),
    reason="needs Graphcore's Poplar SDK (tensorflow.python.ipu, ipu_tensorflow_addons), which "
           "ships the IPUModel emulator; not installable from a package registry")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["pipeline.device_mapping=[0,0,0,0]", "ipu.ipu_model=true", "model.ch=8",
        "training.batch_size=16", "training.steps=4", "training.log_every=2",
        "training.checkpoint_every=2", "training.warmup_steps=2", "ipu.steps_per_execution=0"]


def _four_stage_config(*overrides: str):
    path = os.path.join(ROOT, "pipeline_configs", "digits_4stage_grouped.yaml")
    if os.path.exists(path):
        return load_config(path, TINY + ["pipeline.microbatches=8"] + list(overrides))
    return load_config(os.path.join(ROOT, "pipeline_configs", "digits.yaml"),
                       TINY + ["pipeline.stages=4", "pipeline.microbatches=8"] + list(overrides))


def _tiles_for(cfg) -> int:
    """8 tiles, or the power of two holding twice the plan's memory estimate."""
    from ipu_diffusion.models.unet import build_unet
    from ipu_diffusion.pipeline.ipu_plan import TILE_BYTES, ipu_plan, next_pow2
    from ipu_diffusion.pipeline.partition import partition_unet
    from ipu_diffusion.training.objective import DiffusionObjective

    unet, objective = build_unet(cfg.model), DiffusionObjective(cfg.diffusion)
    part = partition_unet(unet, cfg.pipeline, objective.front_spec, objective.loss_spec)
    need = max(ipu_plan(cfg, part, unet.block_info()).ipu_bytes)
    return max(8, next_pow2(math.ceil(2 * need / TILE_BYTES)))


def test_ipu_emulator_trains_four_stages_on_one_ipu(tmp_path):
    cfg = _four_stage_config()
    cfg = _four_stage_config(f"ipu.tiles_per_ipu={_tiles_for(cfg)}")
    metrics = ipu_train.train(cfg, str(tmp_path / "run"), verbose=0)
    assert metrics["steps"] == 4 and metrics["backend"] == "ipu"
    assert metrics["final_loss"] is not None and math.isfinite(metrics["final_loss"])
    assert os.path.exists(tmp_path / "run" / "metrics.json")
    assert os.listdir(tmp_path / "run" / "checkpoints")
