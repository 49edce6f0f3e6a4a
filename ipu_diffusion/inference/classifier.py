"""The noise-aware classifier p_phi(y | x_t, t) of classifier guidance: its network and
its loading (training it: ``training/classifier.py``).

The network is the U-Net's encoder half -- the ``embed``, ``in_conv``, ``down*`` and
``mid_*`` blocks of ``models.plan.plan_unet``, built by ``models.unet.make_block_layer``
from the same layer code -- followed by a pooling head: GroupNorm -> swish -> global
average pool -> Dense(num_classes). It takes the timestep like the U-Net does, so one
network classifies at every noise level.

    clf = load_classifier("runs/digits_cond/classifier")
    logits = clf.logits_fn(x_t, t)                        # [B, num_classes]

A classifier directory holds ``classifier_weights.npz`` and ``classifier.json`` (the
model and diffusion sections it was built for, its training settings and its accuracy
on noised held-out images at a few t).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List

import numpy as np
import tensorflow as tf

from ipu_diffusion._keras import keras
from ipu_diffusion.config import ModelConfig, RunConfig, config_from_dict, to_dict
from ipu_diffusion.diffusion.guidance import GuidanceError
from ipu_diffusion.models import layers as L
from ipu_diffusion.models.plan import BlockPlan, plan_unet
from ipu_diffusion.models.unet import make_block_layer

WEIGHTS_FILE = "classifier_weights.npz"  # the get_weights() list: w0, w1, ...
RECORD_FILE = "classifier.json"
ENCODER_END = "mid_res1"  # the last block of the encoder half
ACCURACY_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75)  # t / T at which held-out accuracy is measured


def encoder_config(model: ModelConfig) -> ModelConfig:
    """The U-Net config of the encoder: no label input, no dropout, one output head."""
    return dataclasses.replace(model, num_classes=0, dropout=0.0, learn_sigma=False)


def encoder_plans(model: ModelConfig) -> List[BlockPlan]:
    """The U-Net's blocks up to and including the middle (``embed`` .. ``mid_res1``)."""
    plans = plan_unet(encoder_config(model))
    names = [p.spec.name for p in plans]
    return plans[: names.index(ENCODER_END) + 1]


def build_classifier_model(model: ModelConfig, num_classes: int) -> keras.Model:
    """Functional Keras model ``{x_t [B,H,W,C] float32, t int32 [B], key int32 [B]}`` ->
    logits ``[B, num_classes]`` float32 (``key`` only seeds dropout, which is off)."""
    cfg = encoder_config(model)
    plans = encoder_plans(model)
    size, channels = cfg.image_size, cfg.in_channels
    inputs = {"x_t": keras.Input((size, size, channels), dtype="float32", name="x_t"),
              "t": keras.Input((), dtype="int32", name="t"),
              "key": keras.Input((), dtype="int32", name="key")}
    carry: Dict[str, Any] = dict(inputs)
    for p in plans:
        args = [carry[k] for k in p.spec.inputs]
        carry[p.spec.outputs[0]] = make_block_layer(cfg, p)(args if len(args) > 1 else args[0])
    h = L.group_norm(cfg.num_groups, "head_norm")(carry["h"])
    h = keras.layers.Activation("swish", name="head_swish")(h)
    h = keras.layers.GlobalAveragePooling2D(name="head_pool")(h)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="head_logits")(h)
    return keras.Model(inputs=inputs, outputs=logits, name="noise_aware_classifier")


class NoiseAwareClassifier:
    """A trained classifier: ``logits_fn(x_t, t_original) -> [B, K]`` for guidance."""

    def __init__(self, model: keras.Model, record: Dict[str, Any]):
        self.model = model
        self.record = record
        self.num_classes = int(record["num_classes"])

    def logits_fn(self, x_t: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        t = tf.cast(t, tf.int32)
        inputs = {"x_t": tf.cast(x_t, tf.float32), "t": t, "key": tf.zeros_like(t)}
        return tf.cast(self.model(inputs, training=False), tf.float32)

    def check_compatible(self, run_cfg: RunConfig) -> None:
        """Raise GuidanceError unless the classifier saw the run's images and schedule."""
        mine, theirs = self.record["diffusion"], to_dict(run_cfg)["diffusion"]
        for key in ("schedule", "timesteps"):
            if mine[key] != theirs[key]:
                raise GuidanceError(f"--classifier: trained with diffusion.{key} {mine[key]!r} "
                                    f"but the run uses {theirs[key]!r}; retrain it with the "
                                    "run's config")
        m = run_cfg.model
        for key, value in (("image_size", m.image_size), ("in_channels", m.in_channels)):
            if self.record["model"][key] != value:
                raise GuidanceError(f"--classifier: trained for model.{key} "
                                    f"{self.record['model'][key]} but the run has {value}")


def load_classifier(directory: str) -> NoiseAwareClassifier:
    """Load a classifier directory written by :func:`train_classifier`."""
    record_path = os.path.join(directory, RECORD_FILE)
    if not os.path.isfile(record_path):
        raise GuidanceError(f"--classifier: {directory!r} holds no {RECORD_FILE}; train one with "
                            "python -m ipu_diffusion train-classifier --config FILE --workdir DIR")
    with open(record_path) as f:
        record = json.load(f)
    model_cfg = config_from_dict({"model": record["model"],
                                  "diffusion": record["diffusion"]}).model
    model = build_classifier_model(model_cfg, int(record["num_classes"]))
    with np.load(os.path.join(directory, WEIGHTS_FILE), allow_pickle=False) as f:
        weights = [f[f"w{i}"] for i in range(len(f.files))]
    expected = [tuple(w.shape) for w in model.get_weights()]
    if [tuple(w.shape) for w in weights] != expected:
        raise GuidanceError(f"--classifier: the weights in {directory!r} do not fit the "
                            "classifier this code builds; retrain it with train-classifier")
    model.set_weights(weights)
    return NoiseAwareClassifier(model, record)
