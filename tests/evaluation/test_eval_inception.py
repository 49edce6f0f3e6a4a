"""The Inception loader on a tiny GraphDef with the FID graph's tensor names and shapes."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion.evaluation import EvaluationError, InceptionNet, resolve_inception_path
from ipu_diffusion.evaluation.inception import ENV_VAR

NUM_CLASSES = 16  # the real graph has 1008; the loader reads K from the weights


def build_tiny_graph(path):
    """Same contract as classify_image_graph_def.pb: DecodeJpeg -> Cast -> ExpandDims
    [1, H, W, 3] -> ResizeBilinear 299 -> Sub 128 -> Mul 1/128 -> ... -> pool_3
    [1, 1, 1, 2048] -> pool_3/_reshape [1, 2048] -> softmax/logits/MatMul (+ bias)."""
    rs = np.random.RandomState(0)
    graph = tf.Graph()
    with graph.as_default():
        jpeg = tf.compat.v1.placeholder(tf.uint8, [None, None, 3], name="DecodeJpeg")
        x = tf.expand_dims(tf.cast(jpeg, tf.float32, name="Cast"), 0, name="ExpandDims")
        x = tf.raw_ops.ResizeBilinear(images=x, size=[299, 299], name="ResizeBilinear")
        x = tf.multiply(tf.subtract(x, 128.0, name="Sub"), 1.0 / 128.0, name="Mul")
        x = tf.nn.avg_pool2d(x, 23, 23, "VALID")  # [1, 13, 13, 3]
        kernel = tf.constant(rs.normal(size=(1, 1, 3, 2048)).astype(np.float32))
        x = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "VALID") + 0.1)
        pool3 = tf.nn.avg_pool2d(x, 13, 13, "VALID", name="pool_3")
        flat = tf.reshape(pool3, [1, 2048], name="pool_3/_reshape")
        w = tf.constant(rs.normal(size=(2048, NUM_CLASSES)).astype(np.float32),
                        name="softmax/weights")
        b = tf.constant(np.ones(NUM_CLASSES, np.float32), name="softmax/biases")
        logits = tf.add(tf.matmul(flat, w, name="softmax/logits/MatMul"), b, name="softmax/logits")
        tf.nn.softmax(logits, name="softmax")
    with open(path, "wb") as f:
        f.write(graph.as_graph_def().SerializeToString())
    return graph


def run_reference(graph, feed_name, value):
    """What TTUR's fid.py does: feed one image through the graph in a TF1 session."""
    with tf.compat.v1.Session(graph=graph) as sess:
        pool3, w = sess.run(["pool_3:0", "softmax/weights:0"], {feed_name: value})
    return pool3.reshape(1, 2048), pool3.reshape(1, 2048) @ w


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inception") / "tiny_graph.pb")
    return path, build_tiny_graph(path)


def test_tiny_graph_loads_and_matches_the_reference_feed(tiny):
    path, graph = tiny
    net = InceptionNet(path)
    rs = np.random.RandomState(1)
    images = rs.randint(0, 256, (5, 16, 16, 3)).astype(np.float32) / 127.5 - 1.0
    feats, logits = net(images, batch_size=2, verbose=False)
    assert feats.shape == (5, 2048) and logits.shape == (5, NUM_CLASSES)
    assert feats.dtype == np.float64 and np.isfinite(feats).all()
    # Feeding ExpandDims with the 16x16 image in [0, 255], the graph's own resize runs:
    # our explicit 299x299 resize must give the same features (to float32 round-off).
    for i in (0, 4):
        pixels = np.rint((images[i:i + 1] + 1.0) * 127.5)
        want_f, want_z = run_reference(graph, "ExpandDims:0", pixels)
        np.testing.assert_allclose(feats[i:i + 1], want_f, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logits[i:i + 1], want_z, rtol=1e-3, atol=1e-3)
    assert net.identity.startswith("inception-2015-12-05:")


def test_grey_images_are_repeated_to_rgb(tiny):
    net = InceptionNet(tiny[0])
    grey = np.linspace(-1, 1, 2 * 8 * 8).reshape(2, 8, 8, 1).astype(np.float32)
    a, _ = net(grey, verbose=False)
    b, _ = net(np.repeat(grey, 3, axis=-1), verbose=False)
    np.testing.assert_array_equal(a, b)


def test_env_var_is_used_and_missing_path_names_both(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, tiny[0])
    assert resolve_inception_path() == tiny[0]
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(EvaluationError) as info:
        resolve_inception_path("")
    assert "inception_path" in str(info.value) and ENV_VAR in str(info.value)
    missing = str(tmp_path / "nope.pb")
    with pytest.raises(EvaluationError, match="nope.pb"):
        InceptionNet(missing)


def test_wrong_graph_is_rejected(tmp_path):
    graph = tf.Graph()
    with graph.as_default():
        tf.constant(1.0, name="something_else")
    path = tmp_path / "other.pb"
    path.write_bytes(graph.as_graph_def().SerializeToString())
    with pytest.raises(EvaluationError, match="ExpandDims"):
        InceptionNet(str(path))
    (tmp_path / "junk.pb").write_bytes(b"\xff\x00garbage")
    with pytest.raises(EvaluationError, match="GraphDef"):
        InceptionNet(str(tmp_path / "junk.pb"))
