"""Closed forms for guidance tests: a two-class Gaussian mixture and its exact classifier.

Data: y uniform on {0, 1}, x_0 | y ~ N(mu_y, S^2 I). With a = alpha_bar_t and
d = a S^2 + 1 - a, x_t | y ~ N(sqrt(a) mu_y, d I) (Ho et al. 2020 eq. 4), so

    log p(y | x_t) = log softmax_y( -|x_t - sqrt(a) mu_k|^2 / (2 d) )
    grad_x log p(y | x_t) = sqrt(a) (mu_y - sum_k r_k mu_k) / d,   r = p(. | x_t)
    E[eps | x_t] = sum_k r_k sqrt(1 - a) (x_t - sqrt(a) mu_k) / d

(the last is the mixture of the single-Gaussian oracle's predictions, oracle.py). With
the exact unconditional eps and the exact classifier, guidance with scale 1 turns the
sampler's target into p(x | y) = N(mu_y, S^2 I).
"""
import numpy as np
import tensorflow as tf

MEANS = np.array([[-0.5, -0.5], [0.5, 0.5]], np.float32)  # mu_0, mu_1 in 2-D
S = 0.15


def _levels(diffusion, t, x):
    a = tf.gather(tf.constant(diffusion.alphas_cumprod, tf.float32), t)[:, None]  # [B, 1]
    return a, a * S ** 2 + 1.0 - a


def class_logits(diffusion):
    """``logits_fn(x_t [B, 2], t_original [B]) -> [B, 2]``, the exact log p(y | x_t) + c."""

    def logits_fn(x, t):
        a, d = _levels(diffusion, t, x)
        diff = x[:, None, :] - tf.sqrt(a)[:, :, None] * MEANS[None]  # [B, K, 2]
        return -tf.reduce_sum(diff ** 2, axis=-1) / (2.0 * d)

    return logits_fn


def closed_form_grad(diffusion, x, t, y):
    """grad_x log p(y | x_t) ``[B, 2]`` from the formula above (numpy)."""
    a, d = (v.numpy() for v in _levels(diffusion, tf.constant(t), x))
    r = tf.nn.softmax(class_logits(diffusion)(tf.constant(x), tf.constant(t))).numpy()
    return np.sqrt(a) * (MEANS[y] - r @ MEANS) / d


def mixture_eps(diffusion):
    """``denoise_fn(x_t [B, 2], t_original [B]) -> E[eps | x_t]`` of the mixture."""
    logits_fn = class_logits(diffusion)

    def denoise_fn(x, t):
        a, d = _levels(diffusion, t, x)
        r = tf.nn.softmax(logits_fn(x, t))  # [B, K]
        per_class = (x[:, None, :] - tf.sqrt(a)[:, :, None] * MEANS[None]) / d[:, :, None]
        return tf.sqrt(1.0 - a) * tf.reduce_sum(r[:, :, None] * per_class, axis=1)

    return denoise_fn
