"""``eval.parallel_calls``: the sampling network's batch cut into parts, one call each.

Expected values come from one call of the Keras model on the whole batch; the parts must
be separate calls in the traced graph (twice the convolutions for two parts), uneven
parts included (5 examples in 2, 3 or 7 parts), and never an empty call (7 parts of 5
examples are 5 calls, or with a batch size unknown until run time 7 calls of one example
each, two of them padding; a convolution of zero examples fails on some oneDNN builds)."""
import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion.config import ConfigError, config_from_dict
from ipu_diffusion.inference.generate import conditional_fn_for, denoise_fn_for
from ipu_diffusion.models.unet import build_unet

MODEL = {"image_size": 8, "in_channels": 1, "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
         "attn_resolutions": [4], "num_groups": 4, "dropout": 0.3}
B = 5


def _unet(num_classes):
    cfg = config_from_dict({"model": dict(MODEL, num_classes=num_classes)})
    return build_unet(cfg.model, zero_init=False)


def _inputs(num_classes):
    x = tf.random.stateless_normal([B, 8, 8, 1], (3, 4))
    t = tf.constant([0, 999, 17, 500, 250], tf.int32)
    y = tf.constant([0, 1, 2, 3, 1], tf.int32)[:B] % max(num_classes, 1)
    return x, t, y


def _graph_convs(graph):
    nodes = [op.type for op in graph.get_operations()]
    for f in graph.as_graph_def().library.function:
        nodes += [n.op for n in f.node_def]
    return sum(n == "Conv2D" for n in nodes)


def _convs(fn, *specs):
    return _graph_convs(tf.function(fn).get_concrete_function(*specs).graph)


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_parts_equal_one_call(parts):
    plain, cond = _unet(0), _unet(3)
    x, t, y = _inputs(3)
    key = tf.zeros_like(t)
    want_plain = plain.keras_model({"x_t": x, "t": t, "key": key}, training=False).numpy()
    want_cond = cond.keras_model({"x_t": x, "t": t, "key": key, "y": y}, training=False).numpy()
    got_plain = denoise_fn_for(plain, parts=parts)(x, t).numpy()
    got_cond = conditional_fn_for(cond, parts)(x, t, y).numpy()
    assert got_plain.shape == want_plain.shape and got_cond.shape == want_cond.shape
    np.testing.assert_allclose(got_plain, want_plain, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_cond, want_cond, rtol=0, atol=1e-5)
    specs = (tf.TensorSpec([B, 8, 8, 1]), tf.TensorSpec([B], tf.int32))
    one = _convs(denoise_fn_for(plain), *specs)
    assert one > 0 and _convs(denoise_fn_for(plain, parts=parts), *specs) == min(parts, B) * one


def test_unknown_batch_below_parts_gives_one_example_per_call():
    """A batch whose size is known only at run time (the export's signatures): one graph
    of ``parts`` calls; a batch smaller than ``parts`` is padded, each example in a call of
    its own, as the static path does."""
    plain, parts = _unet(0), 7
    x, t, _ = _inputs(3)
    want = plain.keras_model({"x_t": x, "t": t, "key": tf.zeros_like(t)}, training=False)
    static = tf.function(denoise_fn_for(plain, parts=parts))(x, t)  # B calls of one example
    specs = (tf.TensorSpec([None, 8, 8, 1]), tf.TensorSpec([None], tf.int32))
    fn = tf.function(denoise_fn_for(plain, parts=parts)).get_concrete_function(*specs)
    got = fn(x, t).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got, static.numpy())
    one = _convs(denoise_fn_for(plain), *specs)
    assert _graph_convs(fn.graph) == parts * one


def test_parallel_calls_must_be_positive():
    with pytest.raises(ConfigError, match=r"eval\.parallel_calls"):
        config_from_dict({"eval": {"parallel_calls": 0}})
    assert config_from_dict({}).eval.parallel_calls == 2
