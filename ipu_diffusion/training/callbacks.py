"""Callbacks for ``DiffusionTrainer.fit``: checkpoints, throughput, TensorBoard, sample grids."""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from ipu_diffusion._keras import keras


def _step(model) -> int:
    return int(model.optimizer.iterations.numpy())


class _Every:
    """True once each time the step counter passes a multiple of ``every`` (robust to
    ``steps_per_execution > 1``, where batch-end hooks see every k-th step only)."""

    def __init__(self, every: int):
        self.every = int(every)
        self.prev = None

    def __call__(self, step: int) -> bool:
        prev, self.prev = self.prev, step
        if self.every <= 0 or prev is None:
            return bool(self.every) and step % self.every == 0
        return step // self.every > prev // self.every


class CheckpointCallback(keras.callbacks.Callback):
    """Save through a ``tf.train.CheckpointManager`` every ``every`` steps and at the end.

    The manager writes the data files first and then replaces its index file
    atomically, so an interrupted save never becomes the "latest" checkpoint.
    """

    def __init__(self, manager: tf.train.CheckpointManager, every: int):
        super().__init__()
        self.manager = manager
        self.due = _Every(every)
        self.last_saved = -1

    def save(self) -> Optional[str]:
        step = _step(self.model)
        if step == self.last_saved:
            return None
        self.last_saved = step
        return self.manager.save(checkpoint_number=step)

    def on_train_batch_end(self, batch, logs=None):
        if self.due(_step(self.model)):
            self.save()

    def on_train_end(self, logs=None):
        self.save()


class ThroughputCallback(keras.callbacks.Callback):
    """Adds ``img_per_s`` (host wall clock, per logged batch) to the logs."""

    def __init__(self, global_batch: int):
        super().__init__()
        self.global_batch = global_batch
        self._t0 = None
        self._step0 = 0
        self.img_per_s = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()
        self._step0 = _step(self.model)

    def on_train_batch_end(self, batch, logs=None):
        steps = _step(self.model) - self._step0
        elapsed = time.perf_counter() - self._t0
        if steps > 1 and elapsed > 0:
            # The first step of an epoch may include tracing; it is excluded after step 1.
            self.img_per_s = steps * self.global_batch / elapsed
        if steps == 1:
            self._t0, self._step0 = time.perf_counter(), _step(self.model)
        if logs is not None:
            logs["img_per_s"] = self.img_per_s


class TensorBoardCallback(keras.callbacks.Callback):
    """Scalars (loss, lr, grad norm, img/s) every ``every`` steps into ``logdir``."""

    def __init__(self, logdir: str, every: int):
        super().__init__()
        self.writer = tf.summary.create_file_writer(logdir)
        self.due = _Every(every)

    def on_train_batch_end(self, batch, logs=None):
        step = _step(self.model)
        if logs and self.due(step):
            with self.writer.as_default():
                for name, value in logs.items():
                    tf.summary.scalar(f"train/{name}", float(value), step=step)
            self.writer.flush()

    def image(self, name: str, images: np.ndarray, step: int) -> None:
        """Images in [-1, 1], NHWC."""
        with self.writer.as_default():
            tf.summary.image(name, (images + 1.0) / 2.0, step=step, max_outputs=16)
        self.writer.flush()


class SampleGridCallback(keras.callbacks.Callback):
    """Every ``every`` steps (0: only at the end) sample with the EMA weights and save a grid.

    ``make_samples(step) -> images [N, H, W, C] in [-1, 1]``; ``save(images, path)``
    writes the PNG. Grids go to ``<workdir>/samples/step_<k>.png`` and the newest to
    ``<workdir>/samples.png``. The end-of-training grid is made once ``final_step`` is
    reached (``fit`` may be called more than once per run).
    """

    def __init__(self, workdir: str, every: int, make_samples: Callable[[int], np.ndarray],
                 save: Callable[[np.ndarray, str], None], final_step: int,
                 tensorboard: Optional[TensorBoardCallback] = None):
        super().__init__()
        self.final_step = int(final_step)
        self.workdir = workdir
        self.due = _Every(every)
        self.make_samples = make_samples
        self.save = save
        self.tensorboard = tensorboard
        self.last = -1

    def write(self) -> str:
        step = _step(self.model)
        images = self.make_samples(step)
        os.makedirs(os.path.join(self.workdir, "samples"), exist_ok=True)
        path = os.path.join(self.workdir, "samples", f"step_{step:08d}.png")
        self.save(images, path)
        self.save(images, os.path.join(self.workdir, "samples.png"))
        if self.tensorboard is not None:
            self.tensorboard.image("samples", images, step)
        self.last = step
        return path

    def on_train_batch_end(self, batch, logs=None):
        if self.due(_step(self.model)):
            self.write()

    def on_train_end(self, logs=None):
        step = _step(self.model)
        if step >= self.final_step and step != self.last:
            self.write()
