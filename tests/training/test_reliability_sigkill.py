"""Training SIGKILLed at random moments (also inside checkpoint saves) resumes to
bit-identical state. Its own file, so ``--dist loadfile`` runs it next to the other
reliability tests. ``make soak`` runs it with SOAK_KILLS=50 (the suite: 2, the first
inside a save)."""
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from ipu_diffusion.inference.checkpoints import checkpoint_damage
from tests.training.test_reliability import ROOT, _ckpt_step, _committed, _final_tensors
from tests.training.test_train_e2e import TINY

pytestmark = pytest.mark.slow

SOAK_KILLS = int(os.environ.get("SOAK_KILLS", "2"))  # `make soak` sets 50
SOAK_SEED = int(os.environ.get("SOAK_SEED", "0"))
RESUMED = re.compile(r"^resumed from (\S+) \(step (\d+)\)$", re.M)


def _unrecorded(ckpt_dir):
    """Files of a checkpoint being (or left half) written: the temporary shard directory,
    or files numbered past the recorded newest (the manager records a checkpoint only
    after writing it)."""
    committed = _ckpt_step(_committed(ckpt_dir))
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    return {n for n in names if n.startswith("ckpt-") and (
        "_temp" in n or int(re.split(r"[-._]", n)[1]) > committed)}


def _launch(cmd, log_prefix):
    out, err = open(f"{log_prefix}.out", "w"), open(f"{log_prefix}.err", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
    out.close(), err.close()
    return proc


def _kill_at_random(proc, ckpt_dir, floor, rng, interval, at_save=False):
    """SIGKILL ``proc`` once it has recorded a checkpoint past step ``floor``: either a
    random time within the next 1.5 checkpoint intervals, or (one kill in three, and
    always with ``at_save``) a few milliseconds after the next checkpoint's files start to
    appear, inside the save.
    Returns (killed, the latest measured checkpoint interval in seconds, the unrecorded
    checkpoint files there were just before the kill window)."""
    seen, seen_at, deadline = _committed(ckpt_dir), None, time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        now = _committed(ckpt_dir)
        if now != seen:
            if seen_at is not None:
                interval = time.time() - seen_at
            seen, seen_at = now, time.time()
            if _ckpt_step(now) > floor:
                break
        time.sleep(0.01)
    before = _unrecorded(ckpt_dir)
    if rng.random() < 1 / 3 or at_save:  # aim at the save
        while proc.poll() is None and time.time() < deadline and not _unrecorded(ckpt_dir) - before:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.004))
    else:
        time.sleep(rng.uniform(0, 1.5 * interval))
    if proc.poll() is not None:  # finished (or failed) first
        return False, interval, before
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    return True, interval, before


def test_sigkill_at_random_moments_resumes_exactly(tmp_path):
    """Kill ``python -m ipu_diffusion train`` with SIGKILL at seeded random moments (some
    inside a checkpoint save, always the first) and restart it with --resume until it
    finishes: every restart resumes from the newest recorded checkpoint, which is complete,
    and the final weights, EMA, Adam slots and step equal an uninterrupted run's bit for bit.
    SOAK_KILLS / SOAK_SEED scale it (make soak)."""
    rng = random.Random(SOAK_SEED)
    steps = max(24, 4 * SOAK_KILLS + 16)
    # TINY without residual blocks outside the middle (two, with dropout): a launch's
    # time is mostly tracing the model.
    cfg = dict(TINY, model=dict(TINY["model"], num_res_blocks=0),
               training=dict(TINY["training"], steps=steps, log_every=6, checkpoint_every=2,
                             keep_checkpoints=3, sample_every=0))
    cfg["eval"] = dict(TINY["eval"], at_end=False)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    killed, straight = str(tmp_path / "killed"), str(tmp_path / "straight")
    ckpt_dir = os.path.join(killed, "checkpoints")
    base = [sys.executable, "-m", "ipu_diffusion", "train", "--config", str(config)]
    # The uninterrupted run goes alongside the first launch.
    reference = _launch(base + ["--workdir", straight], str(tmp_path / "straight"))
    # Kill i lands after the launch has recorded a checkpoint past targets[i].
    targets = sorted(rng.sample(range(2, steps - 6, 2), SOAK_KILLS))
    interval, launches, partial = 0.3, [], []
    while True:
        expected = _committed(ckpt_dir)
        if expected is not None:  # the next launch must resume from it, and it is complete
            assert checkpoint_damage(expected) is None, expected
        i = len(launches)
        log = str(tmp_path / f"launch{i}")
        proc = _launch(base + ["--workdir", killed] + (["--resume"] if i else []), log)
        launches.append((log, expected))
        if i == SOAK_KILLS:
            break
        done, interval, before = _kill_at_random(
            proc, ckpt_dir, max(targets[i], _ckpt_step(expected)), rng, interval, at_save=i == 0)
        if not done:
            break
        partial.append(sorted(_unrecorded(ckpt_dir) - before))
    assert proc.wait(timeout=300) == 0, open(log + ".err").read()[-3000:]
    assert reference.wait(timeout=300) == 0, open(str(tmp_path / "straight.err")).read()[-3000:]
    kills = len(launches) - 1
    assert kills >= min(SOAK_KILLS, 3), f"only {kills} kills landed before training finished"

    for n, (log, expected) in enumerate(launches):
        err = open(log + ".err").read()
        assert "Traceback" not in err and "warning: checkpoint" not in err, err[-3000:]
        # a killed save's temporary shard directory is removed by the next launch
        for name in (partial[n - 1] if n else []):
            if name.endswith("_temp"):
                assert f"removed {os.path.join(ckpt_dir, name)}, left by an interrupted" in err
        resumed = RESUMED.findall(err)
        if expected is None:
            assert not resumed, f"launch {n} resumed without a recorded checkpoint"
        else:
            assert resumed and os.path.realpath(resumed[0][0]) == os.path.realpath(expected), \
                f"launch {n} resumed from {resumed}; the newest complete checkpoint was {expected}"
            assert int(resumed[0][1]) == _ckpt_step(expected)
    assert f"done: {steps} steps" in open(log + ".out").read()
    assert not [n for n in os.listdir(ckpt_dir) if n.endswith("_temp")]

    a_prefix, a = _final_tensors(straight)
    b_prefix, b = _final_tensors(killed)
    assert a_prefix.endswith(f"ckpt-{steps}") and b_prefix.endswith(f"ckpt-{steps}")
    assert sorted(a) == sorted(b)
    # Keras 3 stores the weights once, under the optimizer's trainable variables.
    assert any(k.startswith("ema/shadow/") for k in a)
    assert any(k.startswith("unet/") or "_trainable_variables/" in k for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    mid_save = sum(bool(p) for p in partial)
    print(f"\n{kills} SIGKILLs (seed {SOAK_SEED}); {mid_save} left a partially written "
          f"checkpoint behind {[p for p in partial if p]}; resumed from steps "
          f"{[_ckpt_step(e) for _, e in launches[1:]]} of {steps}")
    if SOAK_KILLS >= 20:  # the soak must have exercised the save window
        assert mid_save, "no kill landed inside a checkpoint save; raise SOAK_KILLS"
