"""The trainer's EMA against a float64 transcription of its rule: after update n,
shadow <- d s + (1 - d) w with d = min(decay, (1 + n) / (10 + n)); a skipped step leaves the
shadow bit for bit."""
import numpy as np
import tensorflow as tf

from ipu_diffusion.training.trainer import EMA


def test_ema_follows_the_warmup_rule_and_skips_exactly():
    rng = np.random.default_rng(0)
    weights = [tf.Variable(rng.normal(size=shape).astype(np.float32)) for shape in ((3, 4), (5,))]
    ema = EMA(weights, decay=0.5)
    expected = [w.numpy().astype(np.float64) for w in weights]
    update = tf.function(lambda n, active: ema.update(weights, n, active=active))
    for n, active in [(1, True), (2, True), (3, False), (4, True), (40, True)]:
        for w in weights:
            w.assign(rng.normal(size=w.shape).astype(np.float32))
        before = [s.numpy() for s in ema.shadow]
        update(tf.constant(n, tf.int64), tf.constant(active))
        if not active:
            for s, b in zip(ema.shadow, before):
                np.testing.assert_array_equal(s.numpy(), b)
            continue
        d = min(0.5, (1.0 + n) / (10.0 + n))  # 2/11, 3/12, 5/14, then the cap 0.5
        expected = [d * e + (1 - d) * w.numpy().astype(np.float64) for e, w in zip(expected, weights)]
        for s, e in zip(ema.shadow, expected):
            np.testing.assert_allclose(s.numpy(), e, rtol=1e-6, atol=1e-7)
