"""The executor inside keras.Model.train_step under Model.fit (a tf.function): one SGD step
with the pipelined gradient equals one step with the full-batch gradient."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion._keras import keras
from ipu_diffusion.config import PipelineConfig
from ipu_diffusion.pipeline.fallback import PipelineExecutor
from ipu_diffusion.pipeline.partition import make_partition
from pipeline_fakes import FRONT, LOSS, FakeUNet, make_batch, reference_gradients, toy_front, toy_loss

pytestmark = pytest.mark.keras2
logging.getLogger("ipu_diffusion.pipeline.fallback").setLevel(logging.ERROR)

LR = 0.5


class PipelinedTrainer(keras.Model):
    """Minimal trainer: the update comes from the pipeline executor."""

    def __init__(self, unet, executor):
        super().__init__()
        self.net = unet.keras_model
        self.executor = executor
        self.built = True

    def call(self, inputs, training=False):
        return self.net(inputs, training=training)

    def train_step(self, data):
        loss, grads, _ = self.executor.gradients(data, training=True)
        self.optimizer.apply_gradients(zip(grads, self.executor.variables))
        return {"loss": loss, "gnorm": tf.linalg.global_norm(grads)}


def test_model_fit_step_matches_full_batch_update():
    unet = FakeUNet()
    batch = make_batch(8)
    ref_loss, ref = reference_gradients(unet, batch)
    pipeline = PipelineConfig(stages=2, cuts=("mid",), microbatches=2, schedule="grouped")
    part = make_partition(unet.blocks, pipeline, FRONT, LOSS)
    executor = PipelineExecutor(unet, toy_front, toy_loss, part, pipeline)
    trainer = PipelinedTrainer(unet, executor)
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=LR))
    before = [np.array(v) for v in executor.variables]
    data = tf.data.Dataset.from_tensors(batch).repeat()
    hist = trainer.fit(data, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False).history
    assert hist["loss"][0] == pytest.approx(float(ref_loss), rel=1e-5)
    assert hist["gnorm"][0] == pytest.approx(float(tf.linalg.global_norm(ref)), rel=1e-5)
    after = [np.array(v) for v in executor.variables]
    delta = np.concatenate([(b - a).ravel() for b, a in zip(before, after)])
    want = LR * np.concatenate([np.asarray(tf.convert_to_tensor(g)).ravel() for g in ref])
    assert np.linalg.norm(delta - want) <= 1e-4 * np.linalg.norm(want)
