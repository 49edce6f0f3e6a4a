"""The banner before ``train``'s first step and the summary after it
(ipu_diffusion/training/report.py): the fields issue 16 lists, from the built run and the
metrics dict."""
from __future__ import annotations

import os
from types import SimpleNamespace

from ipu_diffusion.config import config_from_dict
from ipu_diffusion.training.report import banner_lines, summary_lines


def _run(cfg, restored_from=None, workdir="/tmp/w"):
    """A stand-in for training.run.Run with what the banner reads."""
    strategy = SimpleNamespace(num_replicas_in_sync=1, extended=SimpleNamespace(
        worker_devices=("/job:localhost/replica:0/task:0/device:CPU:0",)))
    return SimpleNamespace(cfg=cfg, unet=SimpleNamespace(count_params=lambda: 1112801),
                           strategy=strategy, restored_from=restored_from, workdir=workdir)


def test_banner_names_every_field():
    cfg = config_from_dict({"run": {"name": "d"}, "data": {"source": "digits"},
                            "model": {"image_size": 16, "in_channels": 1, "ch": 32,
                                      "num_groups": 8},
                            "training": {"steps": 3000, "batch_size": 64}})
    lines = banner_lines(_run(cfg), 0, "cfg.yaml")
    text = "\n".join(lines)
    assert lines[0] == "train d"
    # 1,797 scikit-learn digits, test_fraction 0.2 held out (360): 1,437 for training
    assert "  data       digits (scikit-learn 8x8 digits, train split): 1,437 images" in lines
    assert f"  config     {os.path.abspath('cfg.yaml')}" in lines
    for row in ("  images     16x16x1", "  model      U-Net, 1,112,801 parameters",
                "  steps      3,000 of batch 64", "  precision  float32",
                "  devices    default, 1 replica(s) on CPU:0", "  workdir    /tmp/w",
                "  resumed    no, a new run"):
        assert row in text, row
    resumed = banner_lines(_run(cfg, restored_from="/tmp/w/checkpoints/ckpt-500"), 500, None)
    assert "  resumed    yes, from /tmp/w/checkpoints/ckpt-500 (step 500)" in resumed


METRICS = {"steps": 3000, "resumed_from": 0, "wall_time_s": 395.2, "img_per_s": 509.1,
           "final_loss": 0.031234, "samples": "/tmp/w/samples.png",
           "eval": {"num_samples": 1000, "sampler": "ddim", "steps": 50,
                    "feature_net": "digits classifier", "fid": 1.234, "floor_fid": 0.891,
                    "inception_score": 8.5, "floor_inception_score": 9.01, "precision": 0.8,
                    "floor_precision": 0.94, "recall": 0.7, "floor_recall": 0.95,
                    "near_copies": 0.002}}


def test_summary_puts_each_score_next_to_its_floor():
    lines = summary_lines(METRICS, "/tmp/w")
    assert lines[0] == "done: 3000 steps in 395.2 s, 509.1 img/s, final loss 0.0312"
    assert ("             FID 1.23 (floor 0.89), IS 8.50 (floor 9.01), precision 0.800 "
            "(floor 0.940), recall 0.700 (floor 0.950)") in lines
    assert "             near copies of training images: 0.2%" in lines
    assert "  samples    /tmp/w/samples.png" in lines
    assert "  metrics    /tmp/w/metrics.json" in lines


def test_summary_without_evaluation_or_samples():
    bare = dict(METRICS, samples=None, resumed_from=1000, final_loss=None)
    del bare["eval"]
    lines = summary_lines(bare, "w")
    assert lines == ["done: 3000 steps in 395.2 s, 509.1 img/s, final loss - (resumed at "
                     "step 1,000)", "  metrics    " + os.path.join("w", "metrics.json")]
    no_fid = dict(METRICS, eval={"feature_net": None, "note": "no FID/KID: set x"})
    assert "  eval       no FID/KID: set x" in summary_lines(no_fid, "w")


def test_default_strategy_names_the_device_tensorflow_places_ops_on():
    cfg = config_from_dict({"run": {"name": "d"}})
    run = _run(cfg)
    run.strategy = SimpleNamespace(num_replicas_in_sync=1, extended=SimpleNamespace())
    line = [x for x in banner_lines(run, 0, None) if x.startswith("  devices")][0]
    assert line in ("  devices    default, 1 replica(s) on CPU:0",
                    "  devices    default, 1 replica(s) on GPU:0")


def test_throughput_with_one_step_epochs_and_after():
    """img/s of one-step epochs (log_every 1) is their own rate, first batch and all; once
    an epoch has a second batch, the rate leaves the epochs' first batches out."""
    from types import SimpleNamespace

    import tensorflow as tf

    from ipu_diffusion.training.callbacks import ThroughputCallback

    now = [0.0]
    step = tf.Variable(0, dtype=tf.int64)
    cb = ThroughputCallback(64, clock=lambda: now[0])
    cb.set_model(SimpleNamespace(optimizer=SimpleNamespace(iterations=step)))
    seen = []

    def batch(seconds):
        now[0] += seconds
        step.assign_add(1)
        logs = {}
        cb.on_train_batch_end(0, logs)
        seen.append(logs["img_per_s"])

    cb.on_epoch_begin(0)
    batch(2.0)                   # one step in 2 s: 32 img/s
    cb.on_epoch_begin(1)
    batch(1.0)                   # still no steady rate: 64 img/s
    batch(0.5)
    batch(0.5)                   # 2 steps in 1 s after the first: 128 img/s
    cb.on_epoch_begin(2)
    batch(5.0)                   # a slow first batch does not replace the steady rate
    assert seen == [32.0, 64.0, 128.0, 128.0, 128.0]
