"""The trainer's Adam (TensorFlow's fused kernel per variable) against a float64 numpy
transcription of Kingma & Ba 2015, algorithm 1 with Keras' placement of epsilon (added
to sqrt(v) after the step size's bias correction), and against Keras' own Adam."""
import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion._keras import keras
from ipu_diffusion.training.trainer import FusedAdam

pytestmark = pytest.mark.keras2  # tf_keras' optimizer calls update_step differently

# epsilon large enough that where it is added shows (Keras: after the bias correction)
LR, B1, B2, EPS, STEPS = 1e-2, 0.9, 0.99, 1e-3, 20
SHAPES = [(3, 3, 4, 8), (8,), (17, 5)]


def numpy_adam(x0, grads):
    x = [a.astype(np.float64) for a in x0]
    m = [np.zeros_like(a) for a in x]
    v = [np.zeros_like(a) for a in x]
    for t, g in enumerate(grads, start=1):
        alpha = LR * np.sqrt(1 - B2 ** t) / (1 - B1 ** t)
        for i, gi in enumerate(g):
            m[i] = B1 * m[i] + (1 - B1) * gi
            v[i] = B2 * v[i] + (1 - B2) * gi ** 2
            x[i] = x[i] - alpha * m[i] / (np.sqrt(v[i]) + EPS)
    return x


def run(optimizer_class, x0, grads):
    variables = [tf.Variable(a) for a in x0]
    opt = optimizer_class(learning_rate=LR, beta_1=B1, beta_2=B2, epsilon=EPS)
    opt.build(variables)

    @tf.function
    def step(g):
        opt.apply_gradients(zip(g, variables))

    for g in grads:
        step([tf.constant(a) for a in g])
    return [v.numpy() for v in variables], int(opt.iterations.numpy())


def test_fused_adam_is_adam():
    rs = np.random.RandomState(0)
    x0 = [rs.randn(*s).astype(np.float32) for s in SHAPES]
    grads = [[rs.randn(*s).astype(np.float32) for s in SHAPES] for _ in range(STEPS)]
    fused, steps = run(FusedAdam, x0, grads)
    assert steps == STEPS
    for got, want, start in zip(fused, numpy_adam(x0, grads), x0):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
        assert np.abs(got - start).max() > 0.05  # it moved
    for got, keras_adam in zip(fused, run(keras.optimizers.Adam, x0, grads)[0]):
        np.testing.assert_allclose(got, keras_adam, rtol=0, atol=1e-6)  # a few float32 ulp
