"""Generated-vs-real metrics, and the two ready-made evaluations.

- :func:`compute_metrics`: FID, KID, Inception Score, precision/recall (and label
  agreement) of generated images against cached reference statistics, under any
  feature network.
- :func:`digits_quality`: the embedded digits, under the digits classifier, against
  the held-out test split; it also reports the FLOOR, the same metrics for real TRAIN
  images against the test split (as many train images as generated ones, so both
  carry the same finite-sample bias). A model cannot be expected to beat the floor.
- :func:`inception_quality`: any data set, under the user's FID Inception graph.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

from ipu_diffusion.data import load_arrays
from ipu_diffusion.evaluation import metrics as M
from ipu_diffusion.evaluation.digits_classifier import load_digits_classifier
from ipu_diffusion.evaluation.features import EvaluationError, FeatureNet, check_images
from ipu_diffusion.evaluation.inception import InceptionNet
from ipu_diffusion.evaluation.reference import ReferenceStats, reference_stats

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10
PR_K = 3


def metrics_from_features(features: np.ndarray, logits: np.ndarray, reference: ReferenceStats,
                          labels: Optional[np.ndarray] = None, seed: int = 0) -> Dict[str, float]:
    """Metrics of features ``[N, D]`` / logits ``[N, K]`` against ``reference``.

    Keys: ``fid``, ``kid``, ``kid_std``, ``inception_score``, ``inception_score_std``,
    ``precision``, ``recall``, ``num_fake``, ``num_real``, and ``label_agreement``
    (fraction with ``argmax(logits) == labels``) when ``labels`` ``[N]`` are given.
    """
    mu, sigma = M.gaussian_stats(features)
    kid, kid_std = M.kid(features, reference.features, KID_SUBSETS, KID_SUBSET_SIZE, seed)
    score, score_std = M.inception_score(logits, min(IS_SPLITS, len(logits)))
    precision, recall = M.precision_recall(reference.features, features, PR_K)
    out = {"fid": M.frechet_distance(mu, sigma, reference.mu, reference.sigma),
           "kid": kid, "kid_std": kid_std,
           "inception_score": score, "inception_score_std": score_std,
           "precision": precision, "recall": recall,
           "num_fake": float(len(features)), "num_real": float(len(reference.features))}
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != len(logits):
            raise EvaluationError(f"labels: {labels.shape[0]} labels for {len(logits)} images")
        out["label_agreement"] = float((np.argmax(logits, axis=1) == labels).mean())
    return out


def compute_metrics(fake_images, reference: ReferenceStats, feature_net: FeatureNet,
                    labels: Optional[np.ndarray] = None, batch_size: int = 250, seed: int = 0,
                    verbose: bool = True) -> Dict[str, float]:
    """Metrics of generated images float32 ``[N, H, W, C]`` in [-1, 1] against
    ``reference`` (from :func:`reference_stats` with the same ``feature_net``)."""
    if feature_net.identity != reference.record.get("network"):
        raise EvaluationError(f"reference statistics {reference.path} were computed with "
                              f"{reference.record.get('network')!r}, not {feature_net.identity!r}")
    features, logits = feature_net(check_images(fake_images, "fake_images"), batch_size, verbose)
    return metrics_from_features(features, logits, reference, labels, seed)


def _digits_name(run_config, split: str) -> str:
    m = run_config.model
    return f"digits-{split}-{m.image_size}px-{m.in_channels}ch-tf{run_config.data.test_fraction:g}"


def digits_quality(fake_images, run_config, cache_dir: str, labels: Optional[np.ndarray] = None,
                   seed: int = 0, verbose: bool = True) -> Dict[str, float]:
    """Digits metrics of generated images ``[N, S, S, C]`` in [-1, 1] (S =
    ``model.image_size``, C = ``model.in_channels``) against the test split, plus the
    ``floor_*`` figures (real train vs test; ``floor_label_agreement`` is the
    classifier's accuracy on those train images) and ``classifier_test_accuracy``."""
    if run_config.data.source != "digits":
        raise EvaluationError(f"digits_quality needs data.source 'digits', got "
                              f"{run_config.data.source!r}; use inception_quality instead")
    fake = check_images(fake_images, "fake_images")
    net = load_digits_classifier(run_config, cache_dir, verbose)
    x_test, _ = load_arrays(run_config, "test")
    x_train, y_train = load_arrays(run_config, "train")
    test_ref = reference_stats(x_test, net, cache_dir, _digits_name(run_config, "test"),
                               verbose=verbose)
    train_ref = reference_stats(x_train, net, cache_dir, _digits_name(run_config, "train"),
                                verbose=verbose)
    out = compute_metrics(fake, test_ref, net, labels, seed=seed, verbose=verbose)
    pick = np.random.RandomState(seed).choice(len(x_train), min(len(fake), len(x_train)),
                                              replace=False)
    floor = metrics_from_features(train_ref.features[pick], train_ref.logits[pick], test_ref,
                                  y_train[pick], seed)
    out.update({f"floor_{k}": v for k, v in floor.items()})
    out["classifier_test_accuracy"] = float(net.record["test_accuracy"])
    return out


def inception_quality(fake_images, run_config, cache_dir: str, inception_path: str = "",
                      split: str = "train", seed: int = 0,
                      verbose: bool = True) -> Dict[str, float]:
    """FID/KID/IS/precision/recall of generated images ``[N, H, W, C]`` in [-1, 1] under
    the FID Inception graph (``inception_path``, else ``eval.inception_path``, else
    ``$IPU_DIFFUSION_INCEPTION``) against ``split`` of ``run_config.data`` (the training
    images by default, as DDPM's CIFAR-10 FID is computed)."""
    net = InceptionNet(inception_path or run_config.eval.inception_path)
    real, _ = load_arrays(run_config, split)
    d, m = run_config.data, run_config.model
    where = d.tfds_name if d.source == "tfds" else os.path.basename(os.path.normpath(d.path or "."))
    name = f"{d.source}-{where}-{split}-{m.image_size}px-{m.in_channels}ch"
    ref = reference_stats(real, net, cache_dir, name, batch_size=50, verbose=verbose)
    return compute_metrics(fake_images, ref, net, batch_size=50, seed=seed, verbose=verbose)

