"""mixed_float16 through the real trainer (issue 15, item 1): the gradient is unscaled
before its norm is taken and clipped, and an overflow lowers the loss scale and is
skipped without counting as a failure."""
import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion._keras import keras
from ipu_diffusion.data import make_dataset
from ipu_diffusion.training import trainer as trainer_module
from ipu_diffusion.training.run import build_run, fit_in_chunks, restore_latest, train
from tests.training.test_train_e2e import _cfg

pytestmark = pytest.mark.slow

SETTINGS = ("model.dropout=0.0", "training.num_sample_images=0", "training.steps=2")


def _flat(grads):
    return np.concatenate([np.ravel(g) for g in grads]).astype(np.float64)


@pytest.fixture
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A float32 and a mixed_float16 run of the same seed (clipping on, at 0.1), and the
    gradients of their first batch: the float32 one from a plain GradientTape, the
    mixed one from the trainer (backward pass on loss x 2^15, then unscaled)."""
    out = {}
    for precision in ("float32", "mixed_float16"):
        cfg = _cfg(*SETTINGS, f"training.precision={precision}", "training.grad_clip=0.1")
        out[precision] = build_run(cfg, str(tmp_path_factory.mktemp(precision)))
    keras.mixed_precision.set_global_policy("float32")
    run32, run16 = out["float32"], out["mixed_float16"]
    cfg = run32.cfg
    batch = next(iter(make_dataset(cfg, cfg.training.batch_size, cfg.run.seed)))
    with tf.GradientTape() as tape:
        terms, _ = run32.trainer.per_example_losses(run32.trainer.carry_from_batch(batch))
        loss = tf.reduce_sum(terms["loss"]) / cfg.training.batch_size
    out["ref"] = (float(loss), _flat(tape.gradient(loss, run32.unet.trainable_variables)))
    out["same_init"] = all(np.array_equal(a.numpy(), b.numpy()) for a, b in
                           zip(run32.unet.trainable_variables, run16.unet.trainable_variables))
    loss16, grads16, _ = run16.trainer.local_gradients(batch)
    out["mixed"] = (float(loss16), _flat(grads16))
    out["scale"] = float(run16.trainer.loss_scale.scale.numpy())
    return out


def test_mixed_float16_step_gradient_is_the_float32_gradient(runs):
    """Equal within fp16 precision, not 2^15 times it."""
    (loss, ref), (loss16, got) = runs["ref"], runs["mixed"]
    assert runs["same_init"] and runs["scale"] == 2.0 ** 15
    np.testing.assert_allclose(loss16, loss, rtol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(got), np.linalg.norm(ref), rtol=2e-2)
    assert got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref)) > 0.999


def test_mixed_float16_logs_and_clips_the_unscaled_norm(runs, float32_policy):
    """One training step with the clip active (at 0.1): the logged gradient norm (taken
    before the clip) and loss are the float32 reference's within fp16 precision."""
    run = runs["mixed_float16"]
    keras.mixed_precision.set_global_policy("mixed_float16")
    cfg = run.cfg
    stream = lambda step: make_dataset(cfg, cfg.training.batch_size, cfg.run.seed,  # noqa: E731
                                       start_step=step)
    logged = fit_in_chunks(run, stream, 0, 1, 1, [], 0)
    loss, ref = runs["ref"]
    assert np.linalg.norm(ref) > 0.1  # the clip is active
    np.testing.assert_allclose(logged["grad_norm"], np.linalg.norm(ref), rtol=2e-2)
    np.testing.assert_allclose(logged["loss"], loss, rtol=1e-2)


def test_overflow_halves_the_scale_and_training_goes_on(tmp_path, monkeypatch, float32_policy):
    """Start at a loss scale of 2^40, which overflows float16 in the backward pass: every
    overflow halves the scale and skips its step without counting as a non-finite step,
    so more overflows than training.max_nonfinite_steps do not stop the run; once the
    gradients fit, the steps update the weights."""
    monkeypatch.setattr(trainer_module.DynamicLossScale.__init__, "__defaults__",
                        (2.0 ** 40, 2000))
    steps = 40
    cfg = _cfg(*SETTINGS, "training.precision=mixed_float16", f"training.steps={steps}",
               "training.max_nonfinite_steps=2", f"training.checkpoint_every={steps}",
               f"training.log_every={steps}")
    workdir = str(tmp_path / "run")
    metrics = train(cfg, workdir, verbose=0)
    assert metrics["steps"] == steps and metrics["skipped_nonfinite_steps"] == 0
    run = build_run(cfg, workdir)
    restore_latest(run, required=True)
    overflows = int(run.trainer.loss_scale.overflows.numpy())
    assert metrics["loss_scale_overflows"] == overflows
    assert 2 < overflows < steps - 5, overflows
    assert float(run.trainer.loss_scale.scale.numpy()) == 2.0 ** (40 - overflows)
    # finite steps followed the last overflow, and the applied updates moved the weights
    assert 0 < int(run.trainer.loss_scale.good_steps.numpy()) <= steps - overflows
    assert np.isfinite(metrics["final_loss"]) and metrics["final_loss"] > 0
    fresh = build_run(cfg, str(tmp_path / "fresh"))
    assert all(np.all(np.isfinite(v.numpy())) for v in run.unet.trainable_variables)
    assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in
               zip(run.unet.trainable_variables, fresh.unet.trainable_variables))
