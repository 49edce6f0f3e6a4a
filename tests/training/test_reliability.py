"""Failure handling: non-finite steps are skipped and stop the run after K in a row;
SIGTERM saves a checkpoint and exits with a resume hint; bad workdirs are refused."""
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import yaml

from ipu_diffusion.training import objective as objective_module
from ipu_diffusion.training.run import RunError, checkpoint_damage, train
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


# --------------------------------------------------------------------------- SIGKILL

SOAK_KILLS = int(os.environ.get("SOAK_KILLS", "5"))  # `make soak` sets 50
SOAK_SEED = int(os.environ.get("SOAK_SEED", "0"))
RESUMED = re.compile(r"^resumed from (\S+) \(step (\d+)\)$", re.M)


def _committed(ckpt_dir):
    """The checkpoint the manager has recorded as newest (None before the first)."""
    state = tf.train.get_checkpoint_state(str(ckpt_dir))
    return state.model_checkpoint_path if state is not None and state.model_checkpoint_path else None


def _ckpt_step(prefix):
    return int(prefix.rsplit("-", 1)[1]) if prefix else 0


def _launch(cmd, log_prefix):
    out, err = open(f"{log_prefix}.out", "w"), open(f"{log_prefix}.err", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
    out.close(), err.close()
    return proc


def _final_tensors(workdir):
    """Every tensor of the newest checkpoint except the save counter (how many saves
    happened differs between a killed and a straight run): weights, EMA, Adam, step."""
    prefix = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    reader = tf.train.load_checkpoint(prefix)
    keys = [k for k in reader.get_variable_to_shape_map()
            if not k.startswith("save_counter") and k != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    return prefix, {k: reader.get_tensor(k) for k in keys}


def _leftovers(ckpt_dir, committed_step):
    """Files a kill left behind mid-save: a temp shard or files of a newer, unrecorded
    checkpoint (the manager records a checkpoint only after writing it)."""
    names = os.listdir(ckpt_dir)
    return sorted(n for n in names if "_temp" in n or (
        n.startswith("ckpt-") and int(n.split(".")[0].split("-")[1]) > committed_step))


def test_sigkill_at_random_moments_resumes_exactly(tmp_path):
    """Kill ``python -m ipu_diffusion train`` with SIGKILL at seeded random moments and
    restart it with --resume until it finishes: every restart resumes from the newest
    recorded checkpoint (which is complete), and the final weights, EMA and Adam state
    equal an uninterrupted run's bit for bit. SOAK_KILLS / SOAK_SEED scale it (make soak)."""
    rng = random.Random(SOAK_SEED)
    steps = max(36, 4 * SOAK_KILLS + 16)
    cfg = dict(TINY, training=dict(TINY["training"], steps=steps, log_every=6,
                                   checkpoint_every=2, keep_checkpoints=3, sample_every=0))
    cfg["eval"] = dict(TINY["eval"], at_end=False)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    killed, straight = str(tmp_path / "killed"), str(tmp_path / "straight")
    ckpt_dir = os.path.join(killed, "checkpoints")
    base = [sys.executable, "-m", "ipu_diffusion", "train", "--config", str(config)]
    # The uninterrupted run, alongside (its TensorFlow import overlaps the others').
    reference = _launch(base + ["--workdir", straight], str(tmp_path / "straight"))
    # Kill i comes after the first checkpoint past targets[i] that the launch itself
    # wrote, plus a random part of a checkpoint interval (steps and saves alike).
    targets = sorted(rng.sample(range(2, steps - 6, 2), SOAK_KILLS))
    interval, launches, mid_save = 0.3, [], 0
    for i in range(SOAK_KILLS + 1):
        expected = _committed(ckpt_dir)
        if expected is not None:  # the resume must start from this one, and it is complete
            assert checkpoint_damage(expected) is None, expected
        log = str(tmp_path / f"launch{i}")
        proc = _launch(base + ["--workdir", killed] + (["--resume"] if i else []), log)
        launches.append((log, expected))
        if i == SOAK_KILLS:
            break
        floor, seen, seen_at = max(targets[i], _ckpt_step(expected)), expected, None
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            now = _committed(ckpt_dir)
            if now != seen:
                if seen_at is not None:
                    interval = time.time() - seen_at
                seen, seen_at = now, time.time()
                if _ckpt_step(now) > floor:
                    break
            time.sleep(0.01)
        if proc.poll() is not None:  # finished (or failed) before the kill
            break
        time.sleep(rng.uniform(0, 1.5 * interval))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        mid_save += bool(_leftovers(ckpt_dir, _ckpt_step(_committed(ckpt_dir))))
    assert proc.wait(timeout=300) == 0, open(log + ".err").read()[-3000:]
    assert reference.wait(timeout=300) == 0, open(str(tmp_path / "straight.err")).read()[-3000:]
    kills = len(launches) - 1
    assert kills >= min(SOAK_KILLS, 3), f"only {kills} kills landed before training finished"

    for n, (log, expected) in enumerate(launches):
        err = open(log + ".err").read()
        assert "Traceback" not in err and "warning: checkpoint" not in err, err[-3000:]
        resumed = RESUMED.findall(err)
        if expected is None:
            assert not resumed, f"launch {n} resumed without a recorded checkpoint"
        else:
            assert resumed and os.path.realpath(resumed[0][0]) == os.path.realpath(expected), \
                f"launch {n} resumed from {resumed}, the newest complete checkpoint was {expected}"
            assert int(resumed[0][1]) == _ckpt_step(expected)
    assert f"done: {steps} steps" in open(log + ".out").read()

    a_prefix, a = _final_tensors(straight)
    b_prefix, b = _final_tensors(killed)
    assert a_prefix.endswith(f"ckpt-{steps}") and b_prefix.endswith(f"ckpt-{steps}")
    assert sorted(a) == sorted(b)
    assert any(k.startswith("ema/shadow/") for k in a) and any(k.startswith("unet/") for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    print(f"\n{kills} SIGKILLs (seed {SOAK_SEED}), {mid_save} left a partial checkpoint "
          f"behind; resumed from steps {[_ckpt_step(e) for _, e in launches[1:]]} of {steps}")
