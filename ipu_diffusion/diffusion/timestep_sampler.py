"""Timestep samplers for training: which t each example gets, and its importance weight.

The samplers draw nothing themselves: they map uniforms ``u`` in (0, 1), float32 ``[B]``,
which the trainer draws from ``ipu_diffusion.rng`` keyed per example (so a microbatched
or recomputed step sees the same t), to ``(t int32 [B], weights float32 [B])`` by the
inverse CDF of p(t). With ``weights = 1 / (T p(t))`` the weighted loss is an unbiased
estimate of the uniform-t loss (Nichol & Dhariwal 2021, section 3.3, eq. 18).

    sampler = make_timestep_sampler("loss_aware", 1000)
    t, w = sampler.sample(rng.uniform(keys, (), salt))
    ...
    sampler.update(t, tf.stop_gradient(unweighted_losses))   # loss_aware only; in-graph
"""
from __future__ import annotations

from typing import Tuple

import tensorflow as tf

from ipu_diffusion.config import TIMESTEP_SAMPLERS


def _inverse_cdf(probs: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """Index i with cdf[i-1] <= u < cdf[i] for probabilities ``[T]``, int32 ``[B]``."""
    cdf = tf.cumsum(probs)
    t = tf.searchsorted(cdf, tf.cast(u, cdf.dtype), side="right", out_type=tf.int32)
    return tf.minimum(t, tf.shape(probs, out_type=tf.int32)[0] - 1)


class UniformSampler:
    """t ~ Uniform{0, ..., T-1} with unit weights (Ho et al. 2020, algorithm 1)."""

    learns = False  # no state: nothing to update or checkpoint

    def __init__(self, num_timesteps: int):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps: must be >= 1, got {num_timesteps!r}")
        self.num_timesteps = int(num_timesteps)

    def probs(self) -> tf.Tensor:
        """float32 ``[T]`` sampling probabilities."""
        return tf.fill([self.num_timesteps], 1.0 / self.num_timesteps)

    def sample(self, u: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        """``u`` float ``[B]`` in (0, 1) -> (t = floor(u T) int32 ``[B]``, ones float32 ``[B]``)."""
        u = tf.cast(u, tf.float32)
        t = tf.minimum(tf.cast(u * self.num_timesteps, tf.int32), self.num_timesteps - 1)
        return t, tf.ones_like(u)


class LossAwareSampler(tf.Module):
    """Importance sampling of t by loss history (Nichol & Dhariwal 2021, eq. 18).

    p(t) ∝ sqrt(E[L_t^2]) over the last ``history`` losses recorded for each t, mixed with
    the uniform distribution by ``uniform_prob``; uniform until every t has ``history``
    entries. L_t is the *unweighted* per-example loss: fed the importance-weighted loss
    w L_t with w ∝ 1 / p(t), the fixed point would be p ∝ sqrt(rms L_t) instead.

    State lives in non-trainable ``tf.Variable``s, tracked by this ``tf.Module`` so a
    ``tf.train.Checkpoint`` holds it (create the sampler outside any ``tf.function``;
    under a distribution strategy, inside its scope, and call ``update`` with the *global*
    batch, i.e. t and losses gathered over replicas, from every replica).

    Notation: history ``[T, K]`` (oldest first), counts ``[T]`` int32, K = ``history``.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 1e-3):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps: must be >= 1, got {num_timesteps!r}")
        if history < 1:
            raise ValueError(f"history: must be >= 1, got {history!r}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob: must be in [0, 1], got {uniform_prob!r}")
        super().__init__(name="loss_aware_sampler")
        self.num_timesteps, self.history_per_term = int(num_timesteps), int(history)
        self.uniform_prob = float(uniform_prob)
        kw = dict(trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.loss_history = tf.Variable(tf.zeros([num_timesteps, history], tf.float32),
                                        name="loss_history", **kw)
        self.loss_counts = tf.Variable(tf.zeros([num_timesteps], tf.int32),
                                       name="loss_counts", **kw)

    def warmed_up(self) -> tf.Tensor:
        """bool scalar: every t has a full history."""
        return tf.reduce_all(self.loss_counts.read_value() >= self.history_per_term)

    def probs(self) -> tf.Tensor:
        """float32 ``[T]``: sqrt(mean(history^2)) normalised, mixed with uniform_prob / T;
        exactly uniform before warm-up."""
        T = self.num_timesteps
        rms = tf.sqrt(tf.reduce_mean(tf.square(self.loss_history.read_value()), axis=1))
        learned = rms / tf.maximum(tf.reduce_sum(rms), 1e-30)
        learned = learned * (1.0 - self.uniform_prob) + self.uniform_prob / T
        learned = learned / tf.reduce_sum(learned)
        ok = tf.logical_and(self.warmed_up(), tf.reduce_sum(rms) > 0.0)
        return tf.where(ok, learned, tf.fill([T], 1.0 / T))

    def sample(self, u: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        """``u`` float ``[B]`` in (0, 1) -> (t int32 ``[B]`` by the inverse CDF of
        :meth:`probs`, weights 1 / (T p(t)) float32 ``[B]``)."""
        p = self.probs()
        t = _inverse_cdf(p, u)
        weights = 1.0 / (self.num_timesteps * tf.gather(p, t))
        return t, weights

    learns = True

    def update(self, t: tf.Tensor, losses: tf.Tensor, active=True) -> None:
        """Append ``losses`` float ``[B]`` to the history of their ``t`` int ``[B]``;
        with ``active`` false (a skipped training step) the state is left as it is.

        Same result as appending the examples one by one in batch order (a full row
        drops its oldest entry), done with vectorised gathers and one scatter so it runs
        inside a compiled train step (tf.function orders the two assigns automatically).
        """
        T, K = self.num_timesteps, self.history_per_term
        t = tf.cast(tf.reshape(t, [-1]), tf.int32)
        losses = tf.cast(tf.reshape(losses, [-1]), tf.float32)
        hist, counts = self.loss_history.read_value(), self.loss_counts.read_value()
        same = tf.equal(t[:, None], t[None, :])
        earlier = tf.linalg.band_part(tf.ones_like(same, tf.int32), -1, 0) - tf.eye(
            tf.shape(t)[0], dtype=tf.int32)  # [B, B]: j < i
        rank = tf.reduce_sum(tf.cast(same, tf.int32) * earlier, axis=1)  # occurrence of t_i so far
        added = tf.math.unsorted_segment_sum(tf.ones_like(t), t, T)  # [T]
        total = counts + added
        dropped = total - tf.minimum(total, K)  # oldest entries that fall off, [T]
        # Old entries shift left by `dropped`; slots past the old ones are filled below.
        k = tf.range(K)[None, :]
        src = k + dropped[:, None]  # [T, K] position in the old row
        kept_old = src < counts[:, None]
        new_hist = tf.where(kept_old, tf.gather(hist, tf.minimum(src, K - 1), batch_dims=1), hist)
        slot = tf.gather(counts, t) + rank - tf.gather(dropped, t)  # [B]
        keep = slot >= 0
        rows = tf.where(keep, t, T)  # dropped new entries go to a scratch row
        idx = tf.stack([rows, tf.maximum(slot, 0)], axis=1)
        padded = tf.concat([new_hist, tf.zeros([1, K], tf.float32)], axis=0)
        new_hist = tf.tensor_scatter_nd_update(padded, idx, losses)[:T]
        self.loss_history.assign(tf.where(active, new_hist, hist))
        self.loss_counts.assign(tf.where(active, tf.minimum(total, K), counts))


def make_timestep_sampler(name: str, num_timesteps: int, **kwargs):
    """``"uniform"`` -> :class:`UniformSampler`, ``"loss_aware"`` -> :class:`LossAwareSampler`
    (``kwargs``: ``history``, ``uniform_prob``)."""
    if name == "uniform":
        if kwargs:
            raise ValueError(f"kwargs: the uniform sampler takes no options, got {sorted(kwargs)}")
        return UniformSampler(num_timesteps)
    if name == "loss_aware":
        return LossAwareSampler(num_timesteps, **kwargs)
    raise ValueError(f"name: unknown timestep sampler {name!r}; choose one of "
                     f"{', '.join(TIMESTEP_SAMPLERS)}")
