"""Callbacks for ``DiffusionTrainer.fit``: checkpoints, throughput, TensorBoard, sample grids."""
from __future__ import annotations

import os
import signal
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

    The manager writes a checkpoint's shard into ``ckpt-N_temp/``, renames it to
    ``ckpt-N.data-*``, writes ``ckpt-N.index``, and only then records ``ckpt-N`` in the
    ``checkpoint`` state file, which it replaces atomically (temporary file + rename). A
    save killed at any point therefore leaves the previous checkpoint as the newest
    recorded one; ``run.restore_latest`` reads only recorded checkpoints and falls back
    past a recorded one whose files are damaged anyway. ``tests/training/
    test_reliability.py`` SIGKILLs training, also inside saves, and checks both.
    """

    def __init__(self, manager: tf.train.CheckpointManager, every: int):
        super().__init__()
        self.manager = manager
        self.due = _Every(every)
        self.last_saved = -1

    def save(self) -> Optional[str]:
        """Save unless this step is already saved or a non-finite streak is under way (the
        newest checkpoint then stays the last good state)."""
        step = _step(self.model)
        guard = getattr(self.model, "guard", None)  # the IPU pipeline model has none
        if step == self.last_saved or (guard is not None and int(guard.consecutive.numpy()) > 0):
            return None
        self.last_saved = step
        return self.manager.save(checkpoint_number=step)

    def on_train_batch_end(self, batch, logs=None):
        if self.due(_step(self.model)):
            self.save()

    def on_train_end(self, logs=None):
        if getattr(self.model, "abort_reason", None) is None:
            self.save()


class ThroughputCallback(keras.callbacks.Callback):
    """Adds ``img_per_s`` to the logs: host wall clock from the end of each epoch's first
    batch (which may include tracing) to the current batch. Until some epoch has a second
    batch (one-step epochs: ``training.log_every: 1``), the rate of the first batches
    themselves, measured from the start of their epoch."""

    def __init__(self, global_batch: int, clock=time.perf_counter):
        super().__init__()
        self.global_batch, self.clock = global_batch, clock
        self._begin = self._start = None
        self._steady = False  # a rate without an epoch's first batch has been measured
        self.img_per_s = 0.0

    def _rate(self, since, now, step) -> float:
        return (step - since[1]) * self.global_batch / (now - since[0]) if now > since[0] else 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = None
        self._begin = (self.clock(), _step(self.model))

    def on_train_batch_end(self, batch, logs=None):
        now, step = self.clock(), _step(self.model)
        if self._start is None:
            self._start = (now, step)
            if not self._steady and self._begin is not None:
                self.img_per_s = self._rate(self._begin, now, step)
        elif now > self._start[0]:
            self.img_per_s, self._steady = self._rate(self._start, now, step), True
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
                guard = getattr(self.model, "guard", None)
                if guard is not None:
                    tf.summary.scalar("train/skipped_nonfinite_steps", int(guard.total.numpy()),
                                      step=step)
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


class StopGuard(keras.callbacks.Callback):
    """Stops ``fit`` cleanly on SIGTERM/SIGINT (the checkpoint callback then saves) or
    after ``max_nonfinite`` consecutive skipped steps (no save: the newest checkpoint is
    the last good one). ``stop_signal`` / ``model.abort_reason`` say which.

    With several workers, ``agree(signum) -> signum`` (every worker's call returns the
    signal any of them received, 0 for none) runs at each batch end, so all stop at the
    same step even when only one was signalled; the non-finite streak is already the
    same everywhere (it comes from the all-reduced loss and gradient norm)."""

    def __init__(self, max_nonfinite: int, agree: Optional[Callable[[int], int]] = None):
        super().__init__()
        self.max_nonfinite = int(max_nonfinite)
        self.agree = agree
        self.signal_received = None  # a signal this process received
        self._agreed = 0
        self._previous = {}

    def _handler(self, signum, frame):
        self.signal_received = signum

    def on_train_begin(self, logs=None):
        self.model.abort_reason = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def on_train_end(self, logs=None):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    @property
    def stop_signal(self) -> int:
        """The signal that stopped training (0: none): this process's own or, with
        ``agree``, the one all workers agreed on at a batch end."""
        if self.agree is None:
            return self.signal_received or 0
        return self._agreed

    @property
    def stopped(self) -> bool:
        return bool(self.stop_signal) or self.model.abort_reason is not None

    def on_train_batch_end(self, batch, logs=None):
        if self.agree is not None and not self._agreed:
            self._agreed = self.agree(self.signal_received or 0)
        if self.stop_signal:
            self.model.stop_training = True
        reason = self.nonfinite_reason(logs or {})
        if reason is not None:
            self.model.abort_reason = reason
            self.model.stop_training = True

    def nonfinite_reason(self, logs) -> Optional[str]:
        """Why training must stop for non-finite steps, or None: ``max_nonfinite``
        consecutive skipped steps (the trainer's ``guard`` counts them)."""
        bad = int(self.model.guard.consecutive.numpy())
        if bad < self.max_nonfinite:
            return None
        return (f"{bad} consecutive steps up to step {_step(self.model)} had a non-finite loss "
                f"or gradient norm (training.max_nonfinite_steps = {self.max_nonfinite})")
