"""A new run directory that starts from imported weights (``import-diffusers``): the
weights become step 0 of the model and of its EMA, so ``sample`` and ``eval`` use them as
they are and ``train --resume`` fine-tunes them."""
from __future__ import annotations

import os
from typing import Callable, Tuple

from ipu_diffusion.config import RunConfig
from ipu_diffusion.training.run import CHECKPOINT_DIR, RunError, build_run, prepare_workdir


def start_run_from_weights(cfg: RunConfig, workdir: str, load: Callable) -> Tuple[str, int]:
    """Write ``config.yaml`` and checkpoint 0 into a new ``workdir``; ``load(unet)`` puts the
    weights into the built U-Net. Returns the checkpoint path and the parameter count.
    (A pipelined or mirrored config needs its devices made first: ``cli.configure_devices``.)"""
    if os.path.exists(os.path.join(workdir, CHECKPOINT_DIR, "checkpoint")):
        raise RunError(f"workdir {workdir} already holds a run; import into a new --workdir")
    prepare_workdir(cfg, workdir, resume=False)
    run = build_run(cfg, workdir)
    load(run.unet)
    for shadow, weight in zip(run.trainer.ema.shadow, run.unet.trainable_variables):
        shadow.assign(weight)  # sample and eval read the EMA: it starts at the imported weights
    return run.manager.save(checkpoint_number=0), int(run.unet.count_params())
