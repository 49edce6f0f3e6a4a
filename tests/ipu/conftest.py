"""The small digits U-Net of ipu_testlib, built once for all IPU tests."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from ipu_testlib import small_config


@pytest.fixture(scope="session")
def small_net():
    from ipu_diffusion.models.unet import build_unet
    from ipu_diffusion.training.objective import DiffusionObjective

    cfg = small_config()
    unet = build_unet(cfg.model, zero_init=False)
    objective = DiffusionObjective(cfg.diffusion, 10, class_dropout=0.3)
    return SimpleNamespace(unet=unet, objective=objective, info=unet.block_info())
