"""ipu_train.train end to end on CPU under Keras 2 (the SDK's Keras is 2.6), with stand-ins
for the SDK objects a one-stage run touches: the IPU strategy (the default one),
ipu_tensorflow_addons' GroupNormalization (Keras' own), the IPU system configuration and,
for the poprun test, popdist.
Runs in ``make test-keras2`` (TF_USE_LEGACY_KERAS=1); skipped under Keras 3, whose
optimizers have no OptimizerV2 slots."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from ipu_testlib import DIGITS

from ipu_diffusion import cli
from ipu_diffusion._keras import IS_KERAS3, keras
from ipu_diffusion.config import load_config
from ipu_diffusion.models import layers
from ipu_diffusion.pipeline import ipu
from ipu_diffusion.training import ipu_train
from ipu_diffusion.training.report import summary_lines

pytestmark = [pytest.mark.keras2, pytest.mark.slow,
              pytest.mark.skipif(IS_KERAS3, reason="needs Keras 2 OptimizerV2 (run with "
                                 "TF_USE_LEGACY_KERAS=1, as make test-keras2 does)")]

# one stage, M = 1, one micro-batch step (= one update) per execution, one resolution
# without attention: the quickest trace (the driver, not the network, is under test)
SHORT = ["model.ch=8", "model.ch_mult=[1]", "model.attn_resolutions=[]", "training.batch_size=16",
         "training.log_every=2", "ipu.steps_per_execution=1", "training.checkpoint_every=2",
         "training.warmup_steps=2"]


def _group_norm(**kwargs):
    assert kwargs.pop("strided_channel_grouping") is False
    return keras.layers.GroupNormalization(**kwargs)


class _PopDist:
    """popdist under ``poprun --num-instances=2``, seen from instance ``index``."""

    def __init__(self, index: int):
        self.index = index

    def getNumInstances(self):  # noqa: N802 (popdist's names)
        return 2

    def getInstanceIndex(self):  # noqa: N802
        return self.index


def _stand_ins(monkeypatch, popdist=None):
    monkeypatch.setattr(ipu, "require_sdk", lambda *args: None)
    monkeypatch.setattr(ipu, "sdk", lambda: SimpleNamespace(
        GroupNormalization=_group_norm, popdist=popdist, reduction_mean="mean"))
    monkeypatch.setattr(ipu, "configure", lambda plan, seed=None: tf.distribute.get_strategy())


@pytest.fixture()
def stand_ins(monkeypatch):
    _stand_ins(monkeypatch)
    yield
    layers.set_group_norm_factory(None)


def test_ipu_train_writes_run_and_restores(stand_ins, tmp_path, capsys):
    """``train-ipu`` through the CLI: banner (with the plan's table), run, summary."""
    workdir = str(tmp_path / "run")
    argv = ["train-ipu", "--config", DIGITS, "--workdir", workdir]
    assert cli.main(argv + [f"--set={s}" for s in SHORT + ["training.steps=4"]]) == 0
    out = capsys.readouterr().out
    with open(os.path.join(workdir, "metrics.json")) as f:
        first = json.load(f)
    assert (first["steps"], first["resumed_from"], first["backend"]) == (4, 0, "ipu")
    assert first["final_loss"] is not None and first["final_loss"] > 0
    for field in ("  config ", "  data       digits", "  model      U-Net, ", "  steps      4 of batch 16",
                  "  devices    IPU, 1 replica(s) x 1 IPU(s) = 1 of ", "  resumed    no, a new run",
                  "execution  steps_per_execution 1", "done: 4 steps in ",
                  f"final loss {first['final_loss']:.4f}", os.path.join(workdir, "metrics.json")):
        assert field in out, (field, out)
    assert out.index("  resumed ") < out.index("stage ") < out.index("done: 4 steps")
    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    names = [n for n, _ in tf.train.list_variables(latest)]
    assert "ema/shadow/0/.ATTRIBUTES/VARIABLE_VALUE" in names  # the CPU trainer's layout
    # a fresh build restores step, weights, Adam and EMA slots, and the synced EMA copy
    from ipu_diffusion.training.run import restore_latest

    run, _ = ipu_train.build_ipu_run(load_config(DIGITS, SHORT + ["training.steps=6"]), workdir)
    assert restore_latest(run, required=True) == 4
    for shadow, slot in zip(run.trainer.ema.shadow, run.trainer.ema_slots):
        np.testing.assert_array_equal(shadow.numpy(), slot.numpy())
    assert any(float(np.abs(s.numpy()).sum()) > 0 for s in run.trainer.ema_slots)


def test_ipu_train_under_poprun_writes_only_on_instance_0(monkeypatch, tmp_path):
    """Instance 1 of two trains (its half of the micro-batches) and writes nothing."""
    _stand_ins(monkeypatch, _PopDist(1))
    try:
        workdir = tmp_path / "run"
        cfg = load_config(DIGITS, SHORT + ["training.steps=2", "ipu.replicas=2",
                                           "training.batch_size=32"])
        metrics = ipu_train.train(cfg, str(workdir), verbose=0)
    finally:
        layers.set_group_norm_factory(None)
    assert metrics["steps"] == 2 and metrics["final_loss"] > 0
    assert not workdir.exists() or not any(workdir.rglob("*")), list(workdir.rglob("*"))
    assert "  metrics    written by instance 0" in summary_lines(metrics, str(workdir))
