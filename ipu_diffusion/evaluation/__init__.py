"""Sample-quality evaluation: FID, KID, Inception Score, precision/recall on features.

    from ipu_diffusion.evaluation import digits_quality
    scores = digits_quality(samples, run_config, cache_dir="runs/cache")  # samples in [-1, 1]
    scores["fid"], scores["floor_fid"]   # generated vs test, and real train vs test

Feature networks: the digits classifier (:mod:`.digits_classifier`) for the embedded
digits, and the FID Inception graph from a local file (:mod:`.inception`).
"""
from __future__ import annotations

from ipu_diffusion.evaluation.digits_classifier import DigitsClassifier, load_digits_classifier
from ipu_diffusion.evaluation.evaluate import (compute_metrics, digits_quality, inception_quality,
                                               metrics_from_features)
from ipu_diffusion.evaluation.features import EvaluationError, FeatureNet
from ipu_diffusion.evaluation.inception import InceptionNet, resolve_inception_path
from ipu_diffusion.evaluation.metrics import (fid, frechet_distance, gaussian_stats,
                                              inception_score, kid, precision_recall)
from ipu_diffusion.evaluation.reference import ReferenceStats, reference_stats
from ipu_diffusion.visualize import make_grid, save_image_grid

__all__ = [
    "DigitsClassifier", "EvaluationError", "FeatureNet", "InceptionNet", "ReferenceStats",
    "compute_metrics", "digits_quality", "fid", "frechet_distance", "gaussian_stats",
    "inception_quality", "inception_score", "kid", "load_digits_classifier", "make_grid",
    "metrics_from_features", "precision_recall", "reference_stats", "resolve_inception_path",
    "save_image_grid",
]
