"""The FID Inception network from a local frozen graph (nothing is downloaded).

The FID literature (Heusel et al. 2017, TTUR's ``fid.py``; openai/improved-gan's
Inception Score code; the DDPM and improved-DDPM evaluations) uses the 2015-12-05
Inception GraphDef ``classify_image_graph_def.pb``. The user supplies that file: the
``inception_path`` argument, ``eval.inception_path`` in the config, or the environment
variable ``IPU_DIFFUSION_INCEPTION``.

Tensor contract, as in those references:
- input ``ExpandDims:0``: float32 ``[N, H, W, 3]``, pixel values in [0, 255]; inside
  the graph ``ResizeBilinear`` (legacy kernel: no half-pixel centres) resizes to
  299x299 and ``Sub``/``Mul`` map to [-1, 1];
- ``pool_3:0``: ``[N, 1, 1, 2048]``, the FID features;
- logits for the Inception Score: ``pool_3`` times the weight matrix feeding
  ``softmax/logits/MatMul`` (``[2048, 1008]``), without the bias, as improved-gan
  computes them (``pool_3/_reshape`` and ``softmax`` have batch size 1 baked in).

The GraphDef is imported with ``tf.compat.v1.import_graph_def`` inside
``tf.compat.v1.wrap_function`` (a TF2 concrete function; no session), with the input
remapped to a batch-polymorphic placeholder.
"""
from __future__ import annotations

import hashlib
import os
from typing import Tuple

import numpy as np
import tensorflow as tf

from ipu_diffusion.evaluation.features import EvaluationError, FeatureNet

ENV_VAR = "IPU_DIFFUSION_INCEPTION"
INPUT_TENSOR = "ExpandDims:0"
POOL3_TENSOR = "pool_3:0"
LOGITS_MATMUL_OP = "softmax/logits/MatMul"
INPUT_SIZE = 299
FEATURE_DIM = 2048


def resolve_inception_path(inception_path: str = "") -> str:
    """The graph file from the argument, else ``$IPU_DIFFUSION_INCEPTION``; a clear error
    naming both when neither gives an existing file."""
    path = inception_path or os.environ.get(ENV_VAR, "")
    if path and os.path.isfile(path):
        return path
    where = (f"{path!r} does not exist" if path else
             "no path was given")
    raise EvaluationError(
        f"the FID Inception graph is needed but {where}; pass inception_path "
        f"(eval.inception_path in the config) or set the environment variable {ENV_VAR} "
        "to a local copy of classify_image_graph_def.pb (the 2015-12-05 Inception graph "
        "from inception-2015-12-05.tgz, as TTUR's fid.py uses); nothing is downloaded")


def to_inception_input(images: np.ndarray) -> tf.Tensor:
    """float ``[N, H, W, C]`` in [-1, 1] -> float32 ``[N, 299, 299, 3]`` in [0, 255].

    Values are rounded to integers, as the reference pipelines see 8-bit images; grey
    is repeated to RGB; the resize is the graph's own ``ResizeBilinear`` kernel (no
    half-pixel centres), so the graph's internal resize is then the identity.
    """
    x = np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0.0, 255.0)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    x = tf.constant(x, tf.float32)
    if x.shape[1] != INPUT_SIZE or x.shape[2] != INPUT_SIZE:
        x = tf.raw_ops.ResizeBilinear(images=x, size=[INPUT_SIZE, INPUT_SIZE],
                                      align_corners=False, half_pixel_centers=False)
    return x


def _read_graph_def(path: str):
    graph_def = tf.compat.v1.GraphDef()
    try:
        with open(path, "rb") as f:
            graph_def.ParseFromString(f.read())
    except Exception as e:  # protobuf DecodeError and friends
        raise EvaluationError(f"inception graph {path!r} is not a binary GraphDef: {e}") from None
    return graph_def


def load_inception_fn(path: str):
    """A concrete function: float32 ``[N, 299, 299, 3]`` in [0, 255] -> (pool3 features
    ``[N, 2048]``, logits ``[N, K]``)."""
    graph_def = _read_graph_def(path)
    names = {node.name for node in graph_def.node}
    for needed in (INPUT_TENSOR.split(":")[0], POOL3_TENSOR.split(":")[0], LOGITS_MATMUL_OP):
        if needed not in names:
            raise EvaluationError(
                f"inception graph {path!r} has no node {needed!r}; expected the 2015-12-05 "
                "FID Inception graph (classify_image_graph_def.pb)")

    def _import(images):
        tf.compat.v1.import_graph_def(graph_def, input_map={INPUT_TENSOR: images}, name="")

    spec = tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3], tf.float32)
    wrapped = tf.compat.v1.wrap_function(_import, [spec])
    graph = wrapped.graph
    with graph.as_default():
        pool3 = graph.get_tensor_by_name(POOL3_TENSOR)
        features = tf.reshape(pool3, [-1, FEATURE_DIM])
        weights = graph.get_operation_by_name(LOGITS_MATMUL_OP).inputs[1]
        logits = tf.matmul(features, weights)
    return wrapped.prune(feeds=wrapped.inputs, fetches=[features, logits])


def file_sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class InceptionNet(FeatureNet):
    """The FID Inception network as a feature network (2048-d pool3, logits)."""

    def __init__(self, inception_path: str = ""):
        self.path = resolve_inception_path(inception_path)
        self.identity = f"inception-2015-12-05:{file_sha1(self.path)[:16]}"
        self._fn = load_inception_fn(self.path)

    def _batch(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        feats, logits = self._fn(to_inception_input(images))
        return feats.numpy(), logits.numpy()

    def __call__(self, images, batch_size: int = 50, verbose: bool = True):
        """Features float64 ``[N, 2048]`` and logits ``[N, K]``; batches of 50 by default
        (299x299 activations are large)."""
        return super().__call__(images, batch_size, verbose)
