"""Failure handling: non-finite steps are skipped and stop the run after K in a row;
SIGTERM saves a checkpoint and exits with a resume hint; bad workdirs and too little
disk space are refused; a damaged newest checkpoint falls back to the previous one.
SIGKILL at random moments: test_reliability_sigkill.py."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import yaml

from ipu_diffusion.inference import Pipeline
from ipu_diffusion.training import objective as objective_module
from ipu_diffusion.inference.checkpoints import checkpoint_damage
from ipu_diffusion.training.run import RunError, build_run, restore_latest, train
from tests.training.test_train_e2e import ARTEFACTS, TINY, _cfg

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
    metrics = train(_cfg("model.dropout=0.0", "training.steps=6"),
                    str(tmp_path / "r"), verbose=0)
    assert metrics["steps"] == 6 and metrics["skipped_nonfinite_steps"] == 2


def test_consecutive_nonfinite_steps_stop_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(objective_module, "training_losses", _nan_every(0, offset=3))
    workdir = str(tmp_path / "r")
    with pytest.raises(RunError, match=r"consecutive steps up to step 7 .*max_nonfinite_steps = 4"):
        train(_cfg("model.dropout=0.0", "training.steps=20",
                   "training.max_nonfinite_steps=4"), workdir, verbose=0)
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
    cfg = dict(TINY,  # more steps than a fast machine runs before the signal; no periodic save
               training=dict(TINY["training"], steps=4000, log_every=5, checkpoint_every=10000))
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
    assert 0 < step < 4000


def test_too_little_disk_space_is_refused_before_training(tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=100_000))
    workdir = str(tmp_path / "r")
    with pytest.raises(RunError) as err:
        train(_cfg(), workdir, verbose=0)
    # 10,593 parameters: 4 x 4 bytes each = 165.5 KiB a checkpoint; 3 kept + 1, x1.25
    assert re.search(rf"workdir {re.escape(workdir)}: 97.7 KiB free but about 827.6 KiB needed "
                     r"for checkpoints \(3 kept \+ 1 being written, 165.5 KiB each", str(err.value))
    assert "training.keep_checkpoints" in str(err.value)
    assert tf.train.get_checkpoint_state(os.path.join(workdir, "checkpoints")) is None


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    """A recorded checkpoint whose data file is torn is skipped with a warning; resume
    restores the one before it and retrains to the identical state. Files of a save
    that never got recorded are ignored; a finished run resumed writes a missing final
    grid; when every checkpoint is damaged, it stops."""
    cfg = _cfg(*ARTEFACTS, "training.steps=6", "training.checkpoint_every=3")
    workdir = str(tmp_path / "r")
    ckpt = os.path.join(workdir, "checkpoints")
    train(cfg, workdir, verbose=0)
    prefix, before = _final_tensors(workdir)
    assert prefix.endswith("ckpt-6") and checkpoint_damage(prefix) is None
    data = prefix + ".data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    assert "Read less bytes than requested" in checkpoint_damage(prefix)
    # sample/eval (inference.Pipeline, the EMA alone) fall back the same way
    pipe = Pipeline.from_workdir(workdir)
    assert pipe.step == 3 and pipe.restored_from.endswith("ckpt-3")
    assert "warning: checkpoint " in capsys.readouterr().err
    # what a SIGKILL inside the save of step 9 would leave: never recorded, so never
    # restored; the temporary shard directory is removed at start-up
    os.makedirs(os.path.join(ckpt, "ckpt-9_temp"))
    shutil.copy(prefix + ".index", os.path.join(ckpt, "ckpt-9.index"))
    with open(os.path.join(ckpt, "ckpt-9_temp", "part-00000-of-00001.data-00000-of-00001"), "wb") as f:
        f.write(b"\0" * 100)
    capsys.readouterr()

    metrics = train(cfg, workdir, resume=True, verbose=0)
    err = capsys.readouterr().err
    assert f"removed {os.path.join(ckpt, 'ckpt-9_temp')}, left by an interrupted" in err
    assert not os.path.exists(os.path.join(ckpt, "ckpt-9_temp"))
    assert re.search(r"warning: checkpoint \S+/ckpt-6 is damaged \(IndexError: Read less bytes "
                     r"than requested\); falling back to \S+/ckpt-3\n", err), err
    assert re.search(r"resumed from \S+/ckpt-3 \(step 3\)", err), err
    assert (metrics["resumed_from"], metrics["steps"]) == (3, 6)
    prefix, after = _final_tensors(workdir)
    assert prefix.endswith("ckpt-6") and sorted(after) == sorted(before)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)

    # killed after the final checkpoint but before the final grid: resume writes the grid
    os.remove(os.path.join(workdir, "samples.png"))
    metrics = train(cfg, workdir, resume=True, verbose=0)
    assert (metrics["resumed_from"], metrics["steps"]) == (6, 6)
    assert os.path.exists(os.path.join(workdir, "samples.png"))

    for p in (prefix, os.path.join(ckpt, "ckpt-3")):
        with open(p + ".data-00000-of-00001", "r+b") as f:
            f.truncate(10)
    run = build_run(cfg, workdir)
    with pytest.raises(RunError, match=r"every recorded checkpoint in \S+ is damaged \(ckpt-6, "
                                       r"ckpt-3\); restore it from a backup"):
        restore_latest(run, required=True, log=lambda message: None)


# ------------------------------------------------ checkpoint helpers (also the SIGKILL test's)

def _committed(ckpt_dir):
    """The checkpoint the manager has recorded as newest (None before the first)."""
    state = tf.train.get_checkpoint_state(str(ckpt_dir))
    return state.model_checkpoint_path if state is not None and state.model_checkpoint_path else None


def _ckpt_step(prefix):
    return int(prefix.rsplit("-", 1)[1]) if prefix else 0


def _final_tensors(workdir):
    """Every tensor of the newest checkpoint except the save counter (how many saves
    happened differs between a killed and a straight run): weights, EMA, Adam, step."""
    prefix = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    reader = tf.train.load_checkpoint(prefix)
    keys = [k for k in reader.get_variable_to_shape_map()
            if not k.startswith("save_counter") and k != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    return prefix, {k: reader.get_tensor(k) for k in keys}
