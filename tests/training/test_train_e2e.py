"""End to end on the embedded digits: a short run writes its artefacts, resume is exact,
and data-parallel replicas give the one-device update."""
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion.config import config_from_dict
from ipu_diffusion.models.unet import build_unet
from ipu_diffusion.training.run import RunError, build_run, restore_latest, train

pytestmark = pytest.mark.slow

# The training tests are about the trainer (updates, replicas, pipelines, checkpoints,
# resume), not the network, which tests/models and tests/pipeline cover with attention
# and several resolutions: one resolution with its skips, no attention and no sample grid
# builds and traces in half the time of a two-resolution net with attention and a grid.
TINY = {
    "run": {"name": "tiny", "seed": 3},
    "model": {"image_size": 8, "in_channels": 1, "ch": 8, "ch_mult": [1], "num_res_blocks": 1,
              "attn_resolutions": [], "num_groups": 4, "dropout": 0.1},
    "diffusion": {"timesteps": 50},
    "training": {"steps": 6, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "log_every": 3,
                 "checkpoint_every": 3, "num_sample_images": 0, "ema_decay": 0.9,
                 "deterministic": True},
    "data": {"source": "digits"},
    "eval": {"steps": 5, "batch_size": 4, "at_end": False},
}
# the short run also makes sample grids (and its resume must not be perturbed by them)
ARTEFACTS = ("training.num_sample_images=4",)


def _cfg(*overrides):
    return config_from_dict(TINY, list(overrides))


def _state(workdir, cfg):
    run = build_run(cfg, workdir)
    restore_latest(run, required=True)
    return ([v.numpy() for v in run.unet.trainable_variables],
            [v.numpy() for v in run.trainer.ema.shadow],
            [np.asarray(v) for v in run.trainer.optimizer.variables])


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """One uninterrupted 6-step run: (workdir, metrics)."""
    workdir = str(tmp_path_factory.mktemp("six") / "run")
    return workdir, train(_cfg(*ARTEFACTS), workdir, verbose=0)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """The one-device 2-step reference run: (workdir, metrics)."""
    workdir = str(tmp_path_factory.mktemp("two") / "run")
    return workdir, train(_cfg("training.steps=2"), workdir, verbose=0)


def test_short_run_writes_artefacts(six_steps):
    workdir, metrics = six_steps
    assert metrics["steps"] == 6 and np.isfinite(metrics["final_loss"])
    for name in ["config.yaml", "metrics.json", "samples.png", "checkpoints/checkpoint"]:
        assert os.path.exists(os.path.join(workdir, name)), name
    assert json.load(open(os.path.join(workdir, "metrics.json")))["steps"] == 6
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    with pytest.raises(RunError, match="--resume"):
        train(_cfg(), workdir, verbose=0)


def test_resume_gives_the_same_weights(six_steps, tmp_path):
    straight, split = six_steps[0], str(tmp_path / "split")
    train(_cfg(*ARTEFACTS, "training.steps=4"), split, verbose=0)  # stops mid-chunk (log_every 3)
    train(_cfg(*ARTEFACTS), split, resume=True, verbose=0)
    a, b = _state(straight, _cfg(*ARTEFACTS)), _state(split, _cfg(*ARTEFACTS))
    for xs, ys in zip(a, b):
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys):
            np.testing.assert_array_equal(x, y)


class _CountingReduction(tf.distribute.ReductionToOneDevice):
    """Counts the elements of every cross-replica reduction (at tracing; a batch
    reduction is one ``reduce_implementation`` per tensor here)."""

    elements = 0

    def reduce_implementation(self, reduce_op, per_replica_value, destinations, options):
        _CountingReduction.elements += int(np.prod(per_replica_value.values[0].shape))
        return super().reduce_implementation(reduce_op, per_replica_value, destinations, options)


def test_mirrored_two_replicas_equal_one_device(two_steps, tmp_path, monkeypatch):
    """...and the gradients cross the replicas once per step: the trainer's all-reduce
    (to clip by the global norm) is the only one; the optimizer applies its result."""
    class Mirrored(tf.distribute.MirroredStrategy):
        def __init__(self, devices):
            super().__init__(devices, cross_device_ops=_CountingReduction())

    monkeypatch.setattr(tf.distribute, "MirroredStrategy", Mirrored)
    one_dir, one = two_steps
    _CountingReduction.elements = 0
    two = train(_cfg("training.steps=2", "training.strategy=mirrored",
                     "training.num_replicas=2"), str(tmp_path / "two"), verbose=0)
    params = sum(int(np.prod(v.shape)) for v in build_unet(_cfg().model).trainable_variables)
    # one step traced: the gradients once, plus a few scalars (loss, logged metrics)
    assert params <= _CountingReduction.elements < params + 100, (_CountingReduction.elements, params)
    assert one["steps"] == two["steps"] == 2
    # Loss and global gradient norm are scale-sensitive (Adam's update is not): they
    # catch a gradient summed or averaged the wrong way across replicas.
    np.testing.assert_allclose(two["final_loss"], one["final_loss"], rtol=1e-5)
    np.testing.assert_allclose(two["final_grad_norm"], one["final_grad_norm"], rtol=1e-5)
    a = _state(one_dir, _cfg())[0]
    b = _state(str(tmp_path / "two"), _cfg())[0]
    for x, y in zip(a, b):
        # Adam divides by sqrt(v) + eps: summation-order noise in near-zero gradients of
        # zero-initialised layers moves weights by up to ~lr * 1e-1, hence atol 1e-4.
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def test_pipelined_training_equals_unsplit(two_steps, tmp_path):
    """Two stages on two logical CPUs, 2 microbatches, recompute: same loss, gradient
    norm and weights as the one-device run (per-example randomness makes it exact)."""
    one_dir, one = two_steps
    two = train(_cfg("training.steps=2", "pipeline.stages=2", "pipeline.microbatches=2",
                     "pipeline.recompute=true"), str(tmp_path / "two"), verbose=0)
    np.testing.assert_allclose(two["final_loss"], one["final_loss"], rtol=1e-5)
    np.testing.assert_allclose(two["final_grad_norm"], one["final_grad_norm"], rtol=1e-5)
    a = _state(one_dir, _cfg())[0]
    b = _state(str(tmp_path / "two"), _cfg())[0]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)  # Adam: see the mirrored test


PROGRESS = re.compile(r"^[a-z/ ]+  [\d,]+/[\d,]+ (images|epochs)  [\d.,]+ (images|epochs)/s  ")


def test_commands_say_in_one_line_what_they_wrote(six_steps, tmp_path, capsys):
    """sample, eval, reconstruct and interpolate on a trained run: each writes to --out
    and prints one ``wrote ...`` line naming the files (progress lines aside)."""
    from ipu_diffusion import cli

    workdir, _ = six_steps
    out = str(tmp_path)
    commands = {
        "sample": (["--num", "4", "--steps", "3"], [".png", ".npz"]),
        "eval": (["--num-samples", "8", "--steps", "3"], [".png", ".json"]),
        "reconstruct": (["--num", "2", "--steps", "3"], [".png"]),
        "interpolate": (["--frames", "3", "--steps", "3"], [".png"]),
    }
    said = {}
    for command, (flags, suffixes) in commands.items():
        prefix = os.path.join(out, command)
        assert cli.main([command, "--workdir", workdir, "--out", prefix] + flags) == 0
        lines = capsys.readouterr().out.splitlines()
        wrote = [line for line in lines if line.startswith("wrote ")]
        progress = [line for line in lines if PROGRESS.match(line)]
        assert len(wrote) == 1 and len(wrote) + len(progress) == len(lines), (command, lines)
        said[command] = wrote[0]
        for suffix in suffixes:
            assert os.path.isfile(prefix + suffix), (command, suffix)
            assert prefix + suffix in wrote[0], (command, wrote[0])
    with open(os.path.join(out, "eval.json")) as f:
        scores = json.load(f)
    assert scores["num_samples"] == 8 and scores["checkpoint_step"] == 6
    assert f"FID {scores['fid']:.2f} (floor {scores['floor_fid']:.2f})" in said["eval"]
    assert os.path.join(workdir, "metrics.json") in said["eval"]


def test_bfloat16_sampling_of_an_older_checkpoint(six_steps, tmp_path, capsys):
    """``--precision bfloat16 --checkpoint-step 3``: the network computes in bfloat16 on
    ckpt-3's float32 EMA weights; its output is the float32 network's to bfloat16
    rounding, and the images are close to, not equal to, the float32 ones."""
    from ipu_diffusion import cli
    from ipu_diffusion.inference import Pipeline
    from ipu_diffusion.inference.generate import ema_unet

    workdir, _ = six_steps
    fp32 = Pipeline.from_workdir(workdir, step=3)
    bf16 = Pipeline.from_workdir(workdir, ["eval.precision=bfloat16"], step=3)
    (net32, denoise32), (net16, denoise16) = ema_unet(fp32), ema_unet(bf16)
    assert net16.layers["in_conv"].compute_dtype == "bfloat16"
    assert {tf.as_dtype(v.dtype).name for v in net16.trainable_variables} == {"float32"}
    x = tf.random.stateless_normal([4, 8, 8, 1], seed=[1, 2])
    t = tf.constant([0, 10, 50, 99])
    want, got = denoise32(x, t).numpy(), denoise16(x, t).numpy()
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()  # 8-bit mantissas
    images32, images16 = fp32.sample(4, steps=3, seed=1), bf16.sample(4, steps=3, seed=1)
    assert 0 < np.abs(images16 - images32).mean() < 0.05
    prefix = str(tmp_path / "bf16")
    assert cli.main(["eval", "--workdir", workdir, "--num-samples", "8", "--steps", "3",
                     "--precision", "bfloat16", "--checkpoint-step", "3", "--out", prefix]) == 0
    assert "8 bfloat16 ddim-3 samples" in capsys.readouterr().out
    with open(prefix + ".json") as f:
        scores = json.load(f)
    assert (scores["sampling_precision"], scores["checkpoint_step"]) == ("bfloat16", 3)
    assert cli.main(["sample", "--workdir", workdir, "--checkpoint-step", "4"]) == 2
    assert "no checkpoint of step 4" in capsys.readouterr().err


def test_pipeline_from_workdir_restores_the_ema_weights_alone(six_steps, tmp_path):
    """``inference.Pipeline`` reads only the EMA shadow and the step of the newest
    checkpoint: its weights are the checkpoint's tensors, and it samples what the full
    training run restored from the same workdir samples."""
    from ipu_diffusion.inference import Pipeline, WorkdirError
    from ipu_diffusion.inference.generate import ema_unet, sample_images

    workdir, _ = six_steps
    pipe = Pipeline.from_workdir(workdir)
    prefix = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    assert pipe.step == 6 and pipe.restored_from == prefix
    for i, v in enumerate(ema_unet(pipe)[0].trainable_variables):
        np.testing.assert_array_equal(
            v.numpy(), tf.train.load_variable(prefix, f"ema/shadow/{i}/.ATTRIBUTES/VARIABLE_VALUE"))
    run = build_run(_cfg(*ARTEFACTS), workdir)
    restore_latest(run, required=True)
    np.testing.assert_array_equal(pipe.sample(3, steps=4, seed=1),
                                  sample_images(run, 3, 1, steps=4))
    latents = pipe.encode(pipe.sample(2, steps=4), steps=4)
    assert latents.shape == (2, 8, 8, 1) and np.isfinite(latents).all()
    assert pipe.decode(latents, steps=4).shape == (2, 8, 8, 1)
    older = Pipeline.from_workdir(workdir, step=3)  # an older recorded checkpoint, on request
    assert older.step == 3 and older.restored_from.endswith("ckpt-3")
    np.testing.assert_array_equal(
        older.ema.shadow[0].numpy(),
        tf.train.load_variable(older.restored_from, "ema/shadow/0/.ATTRIBUTES/VARIABLE_VALUE"))
    assert not np.array_equal(older.ema.shadow[0].numpy(), pipe.ema.shadow[0].numpy())
    with pytest.raises(WorkdirError, match=r"no checkpoint of step 4; recorded steps: \[3, 6\]"):
        Pipeline.from_workdir(workdir, step=4)
    with pytest.raises(WorkdirError, match="no config.yaml"):
        Pipeline.from_workdir(str(tmp_path))
