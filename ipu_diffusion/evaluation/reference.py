"""Reference statistics of real images, computed once per (data split, feature network).

The features of a real split are cached in ``cache_dir`` as ``<stem>.npz`` (``mu``
``[D]``, ``sigma`` ``[D, D]``, ``features`` ``[N, D]``, ``logits`` ``[N, K]``) beside
``<stem>.json``, which records the data set's identity (sha1 of the image array's
bytes with its dtype and shape), the network's identity and the split's name. A later
call with the same images and network loads the file; a change of either recomputes
and overwrites it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from ipu_diffusion.data.common import dataset_identity
from ipu_diffusion.evaluation.features import FeatureNet
from ipu_diffusion.evaluation.metrics import gaussian_stats

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ReferenceStats:
    """Features of real images and their Gaussian fit; ``recomputed`` tells whether this
    call computed them (False: read from the cache)."""

    mu: np.ndarray  # [D]
    sigma: np.ndarray  # [D, D]
    features: np.ndarray  # [N, D]
    logits: np.ndarray  # [N, K]
    record: Dict[str, object]
    path: str
    recomputed: bool


def cache_stem(cache_dir: str, name: str, network_identity: str) -> str:
    """``<cache_dir>/ref_<name>_<hash of the network identity>`` (no extension)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    net = hashlib.sha1(network_identity.encode("utf-8")).hexdigest()[:12]
    return os.path.join(cache_dir, f"ref_{safe}_{net}")


def _read(stem: str, record: Dict[str, object]) -> Optional[ReferenceStats]:
    try:
        with open(stem + ".json") as f:
            stored = json.load(f)
        if stored != record:
            return None
        with np.load(stem + ".npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("mu", "sigma", "features", "logits")}
    except (OSError, ValueError, KeyError):
        return None  # missing, partial or foreign files: recompute
    return ReferenceStats(record=record, path=stem + ".npz", recomputed=False, **arrays)


def _write(stem: str, record: Dict[str, object], arrays: Dict[str, np.ndarray]) -> None:
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    np.savez(stem + ".tmp.npz", **arrays)
    os.replace(stem + ".tmp.npz", stem + ".npz")
    with open(stem + ".json.tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(stem + ".json.tmp", stem + ".json")  # written last: marks the pair complete


def reference_stats(images: np.ndarray, feature_net: FeatureNet, cache_dir: str, name: str,
                    batch_size: int = 250, verbose: bool = True) -> ReferenceStats:
    """Statistics of real ``images`` float32 ``[N, H, W, C]`` in [-1, 1] under
    ``feature_net``, read from ``cache_dir`` when the recorded data and network
    identities match, else computed and cached. ``name`` names the split (e.g.
    ``"digits-test-16px-1ch"``) and the cache file."""
    record = {"format": FORMAT_VERSION, "name": name, "data": dataset_identity(np.asarray(images)),
              "network": feature_net.identity}
    stem = cache_stem(cache_dir, name, feature_net.identity)
    cached = _read(stem, record)
    if cached is not None:
        return cached
    features, logits = feature_net(images, batch_size=batch_size, verbose=verbose)
    mu, sigma = gaussian_stats(features)
    arrays = {"mu": mu, "sigma": sigma, "features": features, "logits": logits}
    _write(stem, record, arrays)
    return ReferenceStats(record=record, path=stem + ".npz", recomputed=True, **arrays)
