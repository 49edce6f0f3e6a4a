"""What one training step guarantees (issue 15, items 2 and 3), through the real trainer.

- A skipped (non-finite) step leaves the weights, the EMA shadow, Adam's moments and the
  loss-aware sampler's history bit for bit as they were, on one device, with two
  mirrored replicas and pipelined; it advances the step counter and is left out of the
  logged loss average.
- The loss-aware timestep sampler records the *unweighted* per-example loss (Nichol &
  Dhariwal 2021, eq. 18), from the global batch whatever the replicas or microbatches,
  and is checkpointed: a resumed run has the uninterrupted run's history bit for bit.

All runs share one poisoned step (step POISON: loss, gradients and per-example losses
NaN) and T = 4 timesteps,
so the sampler's history (10 per t) fills within the first steps and its importance
weights differ from 1 in the later ones.
"""
import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion.data import make_dataset
from ipu_diffusion.training.run import build_run, fit_in_chunks, restore_latest, train
from ipu_diffusion.training.trainer import DiffusionTrainer
from tests.training.test_train_e2e import _cfg

pytestmark = pytest.mark.slow

STEPS, POISON = 6, 2
SETTINGS = ("diffusion.timesteps=4", "diffusion.schedule=cosine", "diffusion.timestep_sampler=loss_aware",
            "model.dropout=0.0", "training.batch_size=16", f"training.steps={STEPS}",
            "training.num_sample_images=0", "training.checkpoint_every=2", "training.log_every=2")
MIRRORED = ("training.strategy=mirrored", "training.num_replicas=2")
PIPELINED = ("pipeline.stages=2", "pipeline.microbatches=2")


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every step POISON returns a NaN loss, NaN gradients and NaN per-example losses."""
    real = DiffusionTrainer.local_gradients

    def local_gradients(self, data):
        loss, grads, stats = real(self, data)
        poison = tf.equal(self.optimizer.iterations, POISON)
        nan = lambda v: tf.where(poison, tf.constant(np.nan, v.dtype), v)  # noqa: E731
        return nan(loss), [nan(g) for g in grads], {
            k: nan(v) if v.dtype.is_floating else v for k, v in stats.items()}

    monkeypatch.setattr(DiffusionTrainer, "local_gradients", local_gradients)


def _snapshot(run):
    opt, sampler = run.trainer.optimizer, run.objective.sampler
    return {
        "weights": [v.numpy() for v in run.unet.trainable_variables],
        "ema": [v.numpy() for v in run.trainer.ema.shadow],
        "adam": [np.asarray(v) for v in opt.variables if "iteration" not in v.name],
        "history": [sampler.loss_history.numpy(), sampler.loss_counts.numpy()],
        "step": int(opt.iterations.numpy()), "skipped": int(run.trainer.guard.total.numpy()),
    }


def _assert_same(a, b, keys=("weights", "ema", "adam", "history")):
    for key in keys:
        assert len(a[key]) == len(b[key]) > 0, key
        for x, y in zip(a[key], b[key]):
            np.testing.assert_array_equal(x, y, err_msg=key)


def _stream(cfg):
    return lambda step: make_dataset(cfg, cfg.training.batch_size, cfg.run.seed, start_step=step)


# fit() calls: up to the poisoned step, the poisoned step, two more, the last one
SEGMENTS = ((0, POISON), (POISON, POISON + 1), (POISON + 1, STEPS - 1), (STEPS - 1, STEPS))


def _segmented(workdir, *extra):
    """Train STEPS steps, one ``fit`` per segment of SEGMENTS; (run, {step: snapshot
    after it} for step 0 and every segment end, {segment: its logged mean loss})."""
    cfg = _cfg(*SETTINGS, *extra)
    run = build_run(cfg, workdir)
    snaps, losses = {0: _snapshot(run)}, {}
    for begin, end in SEGMENTS:
        losses[begin, end] = fit_in_chunks(run, _stream(cfg), begin, end, end - begin, [], 0)["loss"]
        snaps[end] = _snapshot(run)
    return run, snaps, losses


_RUNS = {}


def _shared(name, tmp_path_factory, *extra):
    """A segmented run built once per module (under the poisoned trainer) and shared."""
    if name not in _RUNS:
        _RUNS[name] = _segmented(str(tmp_path_factory.mktemp(name) / "run"), *extra)
    return _RUNS[name]


@pytest.fixture
def one_device(tmp_path_factory):
    return _shared("one_device", tmp_path_factory)


@pytest.fixture
def mirrored(tmp_path_factory):
    return _shared("mirrored", tmp_path_factory, *MIRRORED)


@pytest.mark.parametrize("which", ["one_device", "mirrored"])
def test_skipped_step_leaves_weights_ema_adam_and_sampler_untouched(which, request):
    run, snaps, losses = request.getfixturevalue(which)
    before, after = snaps[POISON], snaps[POISON + 1]
    _assert_same(before, after)
    assert after["step"] == before["step"] + 1 == POISON + 1  # the batch is consumed
    assert after["skipped"] == before["skipped"] + 1 == 1
    assert losses[POISON, POISON + 1] == 0.0  # nothing counted: an empty mean
    # the steps after it move every part of the state again
    for key in ("weights", "ema", "adam", "history"):
        assert any(not np.array_equal(x, y) for x, y in zip(after[key], snaps[STEPS][key])), key
    assert snaps[STEPS]["skipped"] == 1 and np.all(np.isfinite(np.concatenate(
        [w.ravel() for w in snaps[STEPS]["weights"]])))


def _assert_same_history(a, b):
    """Same timesteps recorded in the same slots; the values equal up to float32
    rounding (a replica or microbatch computes its examples' losses in a smaller batch,
    which may change the last bit)."""
    np.testing.assert_array_equal(a["history"][1], b["history"][1])
    np.testing.assert_allclose(a["history"][0], b["history"][0], rtol=1e-6)


def test_replicas_and_microbatches_feed_the_sampler_the_global_batch(one_device, mirrored,
                                                                      tmp_path):
    """Mirrored (2 replicas) and pipelined (2 stages, 2 microbatches) runs record the
    one-device run's history, the poisoned step included (fed only replica 0's half, or
    each replica its own, the histories would hold other values); the pipelined run logs
    the mean over the finite steps only."""
    ref = one_device[1][STEPS]
    assert ref["history"][1].min() == 10  # every t's history is full: weights are not 1
    _assert_same_history(ref, mirrored[1][STEPS])
    cfg = _cfg(*SETTINGS, *PIPELINED)
    run = build_run(cfg, str(tmp_path / "pipelined"))
    logs = fit_in_chunks(run, _stream(cfg), 0, STEPS, STEPS, [], 0)  # one epoch
    _assert_same_history(ref, _snapshot(run))
    # The mean over the 5 finite steps, from the reference's segment means. The two runs'
    # weights drift apart within Adam's amplification of rounding (see the e2e tests'
    # atol), so their losses agree to ~5e-4; counting the skipped step as a 0 would be
    # 1/6 lower, as a NaN would be NaN.
    sums = [(end - begin) * loss for (begin, end), loss in one_device[2].items()]
    np.testing.assert_allclose(logs["loss"], sum(sums) / (STEPS - 1), rtol=2e-3)


def test_sampler_records_the_unweighted_loss(one_device):
    """At the last step the sampler is warm: the recorded values are each example's
    plain mse (loss_type mse), not mse times its importance weight 1 / (T p(t))."""
    run, snaps, _ = one_device
    step = STEPS - 1
    state = snaps[step]
    for v, x in zip(run.unet.trainable_variables, state["weights"]):
        v.assign(x)
    sampler = run.objective.sampler
    sampler.loss_history.assign(state["history"][0])
    sampler.loss_counts.assign(state["history"][1])
    batch = next(iter(_stream(run.cfg)(step)))
    terms, full = run.trainer.per_example_losses(run.trainer.carry_from_batch(batch))
    t, mse, weight = full["t"].numpy(), terms["mse"].numpy(), full["weight"].numpy()
    assert np.ptp(weight) > 0.05  # importance weights in play
    history = snaps[step + 1]["history"][0]
    for value in np.unique(t):
        recorded = history[value, -int(np.sum(t == value)):]
        np.testing.assert_allclose(recorded, mse[t == value], rtol=1e-5)
        assert not np.allclose(recorded, (mse * weight)[t == value], rtol=1e-3)


def test_resume_restores_the_sampler_history(one_device, tmp_path):
    """``train`` to step 4 (a checkpoint), then ``train --resume`` to 6: weights, EMA, Adam
    and the sampler's history equal the uninterrupted run's bit for bit."""
    workdir = str(tmp_path / "split")
    train(_cfg(*SETTINGS, "training.steps=4"), workdir, verbose=0)
    train(_cfg(*SETTINGS), workdir, resume=True, verbose=0)
    run = build_run(_cfg(*SETTINGS), workdir)
    restore_latest(run, required=True)
    resumed = _snapshot(run)
    assert resumed["step"] == STEPS and resumed["skipped"] == 1
    _assert_same(one_device[1][STEPS], resumed)
