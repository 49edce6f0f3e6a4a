"""Failure handling: non-finite steps are skipped and stop the run after K in a row;
SIGTERM saves a checkpoint and exits with a resume hint; bad workdirs are refused."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import yaml

from ipu_diffusion.training import objective as objective_module
from ipu_diffusion.training.run import RunError, train
from tests.training.test_train_e2e import TINY, _cfg

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _nan_every(period, offset=0):
    """A training_losses that returns NaN on calls number offset, offset+period, ..."""
    real = objective_module.training_losses
    calls = tf.Variable(0, trainable=False)

    def patched(*args, **kwargs):
        terms = real(*args, **kwargs)
        n = calls.assign_add(1) - 1
        poison = tf.equal((n - offset) % period, 0) if period else n >= offset
        terms["loss"] = tf.where(poison, np.nan, terms["loss"])
        return terms

    return patched


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(objective_module, "training_losses", _nan_every(3))
    metrics = train(_cfg("model.dropout=0.0", "training.steps=6"), str(tmp_path / "r"), verbose=0)
    assert metrics["steps"] == 6 and metrics["skipped_nonfinite_steps"] == 2


def test_consecutive_nonfinite_steps_stop_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(objective_module, "training_losses", _nan_every(0, offset=3))
    workdir = str(tmp_path / "r")
    with pytest.raises(RunError, match=r"consecutive steps up to step 7 .*max_nonfinite_steps = 4"):
        train(_cfg("model.dropout=0.0", "training.steps=20", "training.max_nonfinite_steps=4"),
              workdir, verbose=0)
    assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")).endswith("-3")


def test_unwritable_workdir_and_other_run_are_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    if os.access(str(locked), os.W_OK):  # running as root: permissions do not bind
        pytest.skip("cannot make an unwritable directory as this user")
    with pytest.raises(RunError, match="not writable"):
        train(_cfg(), str(locked / "run"), verbose=0)


def test_sigterm_saves_and_resume_finishes(tmp_path):
    cfg = dict(TINY, training=dict(TINY["training"], steps=400, log_every=5, checkpoint_every=1000))
    cfg["eval"] = dict(TINY["eval"], at_end=False)
    path, workdir = tmp_path / "c.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "ipu_diffusion", "train", "--config", str(path),
           "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tb = workdir / "tensorboard"
    deadline = time.time() + 240
    while time.time() < deadline and not (tb.exists() and any(tb.iterdir())):
        time.sleep(0.5)  # TensorBoard files appear once the first steps have run
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    latest = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
    step = int(latest.rsplit("-", 1)[1])
    assert 0 < step < 400
