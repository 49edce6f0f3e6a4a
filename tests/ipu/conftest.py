"""A small class-conditional digits U-Net shared by the IPU tests (built once)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "pipeline_configs", "digits.yaml")
# digits.yaml with ch 8 (71 k parameters), 10 classes, 4 stages of M = 8 microbatches
SMALL = ["model.ch=8", "model.num_classes=10", "data.use_labels=true", "model.dropout=0.2",
         "pipeline.stages=4", "pipeline.microbatches=8", "training.batch_size=64"]


def small_config(*overrides: str):
    from ipu_diffusion.config import load_config

    return load_config(DIGITS, SMALL + list(overrides))


@pytest.fixture(scope="session")
def small_net():
    from ipu_diffusion.models.unet import build_unet
    from ipu_diffusion.training.objective import DiffusionObjective

    cfg = small_config()
    unet = build_unet(cfg.model, zero_init=False)
    objective = DiffusionObjective(cfg.diffusion, 10, class_dropout=0.3)
    return SimpleNamespace(unet=unet, objective=objective, info=unet.block_info())
