"""Training the noise-aware classifier p_phi(y | x_t, t) of classifier guidance (Dhariwal
& Nichol 2021, section 4): its network and loading are in ``inference/classifier.py``.
Training draws t uniformly from 0..T-1 and x_t = sqrt(alpha_bar_t) x_0 +
sqrt(1 - alpha_bar_t) eps (Ho et al. 2020 eq. 4) with the run's own schedule, and
minimises softmax cross-entropy with Adam.

    record = train_classifier(cfg, "runs/digits_cond/classifier", steps=500)

It writes ``classifier_weights.npz`` and ``classifier.json`` (the model and diffusion
sections it was built for, its training settings and its accuracy on noised held-out
images at a few t).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

from ipu_diffusion._keras import keras
from ipu_diffusion.config import RunConfig, to_dict
from ipu_diffusion.diffusion.gaussian import GaussianDiffusion
from ipu_diffusion.diffusion.guidance import GuidanceError
from ipu_diffusion.inference.classifier import (ACCURACY_FRACTIONS, RECORD_FILE, WEIGHTS_FILE,
                                                NoiseAwareClassifier, build_classifier_model)

def _labelled(cfg: RunConfig, split: str) -> Tuple[np.ndarray, np.ndarray]:
    from ipu_diffusion.data import load_arrays

    images, labels = load_arrays(cfg, split)
    if labels is None:
        raise GuidanceError(f"train-classifier needs labels, but data.source {cfg.data.source!r} "
                            "has none (folder: one subfolder per class; npz: a 'labels' array)")
    k = cfg.model.num_classes
    if k <= 0 or int(labels.max()) >= k:
        raise GuidanceError(f"model.num_classes: {k} does not cover the labels 0..{int(labels.max())}"
                            f"; set --set model.num_classes={int(labels.max()) + 1}")
    return images, labels


def noised(diffusion, x0: tf.Tensor, t: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """x_t ~ q(x_t | x_0) (Ho et al. eq. 4) with noise keyed by the int64 pair ``seed``."""
    noise = tf.random.stateless_normal(tf.shape(x0), seed, dtype=x0.dtype)
    return diffusion.q_sample(x0, t, noise)


def _train_step_fn(model: keras.Model, diffusion, optimizer, seed: int) -> Callable:
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    T = diffusion.num_timesteps

    @tf.function
    def step(batch, i):
        x0, y = batch["image"], batch["label"]
        key = tf.stack([tf.constant(seed, tf.int64), tf.cast(i, tf.int64)])
        t = tf.random.stateless_uniform(tf.shape(y), key, 0, T, dtype=tf.int32)
        x_t = noised(diffusion, x0, t, key + [0, 1 << 40])
        with tf.GradientTape() as tape:
            logits = model({"x_t": x_t, "t": t, "key": tf.zeros_like(t)}, training=True)
            loss = loss_fn(y, logits)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        hits = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y),
                                      tf.float32))
        return loss, hits

    return step


def noisy_accuracy(clf: NoiseAwareClassifier, diffusion, images: np.ndarray, labels: np.ndarray,
                   timesteps, seed: int = 0, batch_size: int = 500) -> Dict[str, float]:
    """Top-1 accuracy on ``images`` noised to each of ``timesteps`` (fixed noise seed)."""
    out = {}
    forward = tf.function(lambda x0, t, key: clf.logits_fn(noised(diffusion, x0, t, key), t))
    for t_value in timesteps:
        hits = 0
        for i in range(0, len(images), batch_size):
            x0 = tf.constant(images[i:i + batch_size])
            t = tf.fill([len(x0)], int(t_value))
            logits = forward(x0, t, tf.constant([seed, i], tf.int64))
            pred = np.argmax(logits.numpy(), axis=1)
            hits += int((pred == labels[i:i + batch_size]).sum())
        out[str(int(t_value))] = hits / len(images)
    return out


def train_classifier(cfg: RunConfig, workdir: str, steps: int = 500,
                     batch_size: Optional[int] = None, lr: Optional[float] = None,
                     verbose: bool = True) -> Dict[str, Any]:
    """Train the noise-aware classifier of ``cfg`` (its model, diffusion and data
    sections) for ``steps`` Adam steps; write weights and record into ``workdir``."""
    from ipu_diffusion.data.dataset import batches_from_arrays, held_out_split

    if steps < 1:
        raise GuidanceError(f"--steps: {steps} must be >= 1")
    batch_size, lr = batch_size or cfg.training.batch_size, lr or cfg.training.lr
    images, labels = _labelled(cfg, "train")
    split = held_out_split(cfg)
    held_images, held_labels = _labelled(cfg, split)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    keras.utils.set_random_seed(cfg.run.seed)
    model = build_classifier_model(cfg.model, cfg.model.num_classes)
    step = _train_step_fn(model, diffusion, keras.optimizers.Adam(lr), cfg.run.seed)
    stream = iter(batches_from_arrays(images, labels, batch_size, cfg.run.seed))
    bar = keras.utils.Progbar(steps, unit_name="step") if verbose else None
    began, history = time.time(), []
    for i in range(steps):
        loss, hits = step(next(stream), tf.constant(i, tf.int64))
        history.append((float(loss), float(hits)))
        if bar is not None:
            bar.update(i + 1, [("loss", history[-1][0]), ("acc", history[-1][1])])
    seconds = time.time() - began
    os.makedirs(workdir, exist_ok=True)
    np.savez(os.path.join(workdir, WEIGHTS_FILE),
             **{f"w{i}": w for i, w in enumerate(model.get_weights())})
    tail = np.asarray(history[-50:])
    record = {"num_classes": cfg.model.num_classes, "model": to_dict(cfg)["model"],
              "diffusion": to_dict(cfg)["diffusion"], "data": to_dict(cfg)["data"],
              "steps": steps, "batch_size": batch_size, "lr": lr, "seed": cfg.run.seed,
              "train_seconds": round(seconds, 2), "final_loss": float(tail[:, 0].mean()),
              "final_train_accuracy": float(tail[:, 1].mean()), "heldout_split": split}
    clf = NoiseAwareClassifier(model, record)
    ts = [int(f * diffusion.num_timesteps) for f in ACCURACY_FRACTIONS]
    record["heldout_accuracy_at_t"] = noisy_accuracy(clf, diffusion, held_images, held_labels, ts)
    with open(os.path.join(workdir, RECORD_FILE), "w") as f:
        json.dump(record, f, indent=2)
    return record
