"""The SavedModel export (ipu_diffusion/inference/export.py), loaded by plain TensorFlow in a
process that cannot import this package: ``denoise`` is the EMA network and ``sample``
gives the package's own DDIM images, bit for bit.

The references come from the package's own path in this process (``generate.sample_images``:
numpy respacing, its compiled chain, Grappler off as set in conftest.py; then
``visualize.to_uint8``); the SavedModel runs the exported graph (respacing computed in the
graph) in another process, with TensorFlow's default graph optimisations."""
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion import cli
from ipu_diffusion.config import save_config
from ipu_diffusion.inference import Pipeline
from ipu_diffusion.inference.export import INFO_FILE
from ipu_diffusion.inference.generate import conditional_fn_for, ema_unet, sample_images
from ipu_diffusion.inference.checkpoints import CHECKPOINT_DIR, CONFIG_FILE
from ipu_diffusion.inference.pipeline import EMAWeights
from ipu_diffusion.models.unet import build_unet
from ipu_diffusion.visualize import to_uint8
from tests.training.test_train_e2e import _cfg

pytestmark = pytest.mark.slow

K = 3  # classes of the conditional model; K is its null label
# TINY has eval.batch_size 4 and T = 50: fewer, as many and more (not a multiple) than
# one batch; 3 respaced steps, and all 50 (which sampling.sample does not respace)
CASES = [(3, 3, 0), (4, 3, 1), (5, 3, 2), (5, 50, 3), (9, 1, 2**40 + 5)]

# Runs with ``python -I`` (no PYTHONPATH, no user site) in a temporary directory; the
# editable install's finder is removed too, so ``import ipu_diffusion`` must fail.
LOADER = r"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if p and not __import__("os").path.isdir(p + "/ipu_diffusion")]
try:
    import ipu_diffusion
except ImportError:
    pass
else:
    raise SystemExit("ipu_diffusion is importable: " + ipu_diffusion.__file__)
import json
import numpy as np
import tensorflow as tf

inputs = np.load(sys.argv[1])
cases = json.loads(sys.argv[2])
out = {}
for name in ("plain", "cond"):
    m = tf.saved_model.load(sys.argv[3] if name == "plain" else sys.argv[4])
    args = [inputs["x_t"], inputs["t"]] + ([inputs["y"]] if name == "cond" else [])
    out[name + "_denoise"] = m.denoise(*args).numpy()
    sig = m.signatures["denoise"](**dict(zip(["x_t", "t", "y"], map(tf.constant, args))))
    out[name + "_denoise_sig"] = sig["out"].numpy()
    for num, steps, seed in cases if name == "plain" else cases[:3]:
        images = m.sample(num=num, steps=steps, seed=seed)
        out[f"{name}_sample_{num}_{steps}_{seed}"] = images.numpy()
    sig = m.signatures["sample"](num=tf.constant(5), steps=tf.constant(3),
                                 seed=tf.constant(2, tf.int64))
    out[name + "_sample_sig"] = sig["images"].numpy()
for steps in (0, 51):
    try:
        m.sample(num=2, steps=steps, seed=0)
    except tf.errors.InvalidArgumentError as e:
        out[f"error_{steps}"] = np.array(e.message)
assert "ipu_diffusion" not in sys.modules
np.savez(sys.argv[5], **out)
"""


def _workdir(path, cfg, seed, step):
    """A run directory as ``train`` leaves it for inference, without training: config.yaml
    and a checkpoint at ``step`` of EMA weights drawn with scale 0.3 (a short run's output
    conv is still near its zero initialisation; these make every path, labels included,
    carry signal)."""
    os.makedirs(path)
    save_config(cfg, os.path.join(path, CONFIG_FILE))
    ema = EMAWeights(build_unet(cfg.model).trainable_variables)
    rng = np.random.default_rng(seed)
    for v in ema.shadow:
        v.assign(rng.normal(0.0, 0.3, v.shape).astype(np.float32))
    tf.train.CheckpointManager(tf.train.Checkpoint(ema=ema), os.path.join(path, CHECKPOINT_DIR),
                               max_to_keep=1).save(checkpoint_number=step)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An unconditional and a class-conditional run directory, each exported by the CLI
    (its printed lines kept), and their model sources."""
    root = tmp_path_factory.mktemp("export")
    runs = {"root": root}
    for name, cfg, step in (("plain", _cfg(), 7),
                            ("cond", _cfg(f"model.num_classes={K}", "data.use_labels=true"), 9)):
        workdir = _workdir(str(root / name), cfg, seed=step, step=step)
        out = str(root / (name + "_sm"))
        lines = _capture_stdout(lambda: cli.main(["export", "--workdir", workdir, "--out", out]))
        runs[name] = Pipeline.from_workdir(workdir)
        runs[name + "_sm"], runs[name + "_lines"] = out, lines
    return runs


def _capture_stdout(fn):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert fn() == 0
    return buffer.getvalue().splitlines()


@pytest.fixture(scope="module")
def loaded(runs):
    """The outputs of both SavedModels in a process without the package, and their inputs."""
    root = runs["root"]
    rng = np.random.default_rng(2)
    inputs = {"x_t": rng.normal(size=(5, 8, 8, 1)).astype(np.float32),
              "t": np.array([0, 7, 20, 33, 49], np.int32), "y": np.array([0, 1, 2, K, 1], np.int32)}
    np.savez(root / "inputs.npz", **inputs)
    result = subprocess.run(
        [sys.executable, "-I", "-c", LOADER, str(root / "inputs.npz"), json.dumps(CASES),
         runs["plain_sm"], runs["cond_sm"], str(root / "outputs.npz")],
        cwd=str(root), capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return inputs, dict(np.load(root / "outputs.npz"))


def _reference_samples(source, num, steps, seed):
    return to_uint8(sample_images(source, num, seed, sampler="ddim", steps=steps, eta=0.0))


def test_denoise_is_the_ema_network(runs, loaded):
    inputs, out = loaded
    x_t, t, y = (tf.constant(inputs[k]) for k in ("x_t", "t", "y"))
    plain = ema_unet(runs["plain"])[1](x_t, t).numpy()
    cond = conditional_fn_for(ema_unet(runs["cond"])[0])(x_t, t, y).numpy()
    assert np.abs(plain).max() > 0.1 and np.abs(cond).max() > 0.1
    null = conditional_fn_for(ema_unet(runs["cond"])[0])(x_t, t, tf.fill([5], K)).numpy()
    assert np.abs(cond - null).max(axis=(1, 2, 3))[[0, 1, 2, 4]].min() > 1e-3  # labels matter
    for name, expected in (("plain", plain), ("cond", cond)):
        for key in (name + "_denoise", name + "_denoise_sig"):
            assert out[key].dtype == np.float32 and out[key].shape == expected.shape
            assert np.abs(out[key] - expected).max() <= 1e-5, key


def test_sample_is_the_package_ddim_bit_for_bit(runs, loaded):
    _, out = loaded
    for name, cases in (("plain", CASES), ("cond", CASES[:3])):
        for num, steps, seed in cases:
            got = out[f"{name}_sample_{num}_{steps}_{seed}"]
            expected = _reference_samples(runs[name], num, steps, seed)
            assert got.dtype == np.uint8 and got.shape == (num, 8, 8, 1)
            np.testing.assert_array_equal(got, expected, err_msg=f"{name} {num} {steps} {seed}")
        np.testing.assert_array_equal(out[name + "_sample_sig"],
                                      _reference_samples(runs[name], 5, 3, 2))
    assert 0 < out["plain_sample_5_3_2"].mean() < 255  # not all clipped
    for steps in (0, 51):
        assert "steps: must be in [1, 50]" in str(out[f"error_{steps}"])


def test_cli_export_says_what_it_wrote(runs):
    for name, denoise, step in (("plain", "denoise(x_t, t)", 7), ("cond", "denoise(x_t, t, y)", 9)):
        out = runs[name + "_sm"]
        assert runs[name + "_lines"] == [
            f"wrote {out}: signatures {denoise} and sample(num, steps, seed) of the EMA network "
            f"at checkpoint step {step}"]
        with open(os.path.join(out, INFO_FILE)) as f:
            info = json.load(f)
        assert info["checkpoint_step"] == step and info["image_shape"] == [8, 8, 1]
        assert info["signatures"]["denoise"] == denoise[len("denoise("):-1].split(", ")
