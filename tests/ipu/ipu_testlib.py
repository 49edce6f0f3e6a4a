"""Helpers of the IPU tests: a small class-conditional variant of digits.yaml."""
from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "pipeline_configs", "digits.yaml")
# digits.yaml with ch 8 (71 k parameters), 10 classes, 4 stages of M = 8 microbatches
SMALL = ["model.ch=8", "model.num_classes=10", "data.use_labels=true", "model.dropout=0.2",
         "pipeline.stages=4", "pipeline.microbatches=8", "training.batch_size=64"]


def small_config(*overrides: str):
    from ipu_diffusion.config import load_config

    return load_config(DIGITS, SMALL + list(overrides))
