"""One training run: workdir, strategy, model, checkpoint/resume, ``fit``, samples, metrics."""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import tensorflow as tf

from ipu_diffusion._keras import keras
from ipu_diffusion.config import ConfigError, RunConfig, load_config, resume_conflicts, save_config
from ipu_diffusion.inference import checkpoints as ckpts
from ipu_diffusion.inference.checkpoints import CHECKPOINT_DIR, CONFIG_FILE
from ipu_diffusion.training import callbacks as cb
from ipu_diffusion.training import multi_worker as mw
from ipu_diffusion.training.objective import DiffusionObjective
from ipu_diffusion.training.trainer import DiffusionTrainer, build_optimizer_state, make_optimizer

# A checkpoint holds the weights, their EMA and Adam's two slots: 4 float32 values per
# parameter. Free space must fit the kept checkpoints plus the one being written, with
# this margin for index files, TensorBoard and sample grids.
CHECKPOINT_VALUES_PER_PARAM = 4
DISK_MARGIN = 1.25


class RunError(RuntimeError):
    """A problem with the run directory or the run as a whole; says what to do."""


class Interrupted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; ``signum`` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclass
class Run:
    """Everything a built run holds; ``train`` fits it, ``sample``/``eval`` restore it."""

    cfg: RunConfig
    workdir: str
    strategy: Any
    unet: Any
    objective: DiffusionObjective
    trainer: DiffusionTrainer
    checkpoint: tf.train.Checkpoint
    manager: tf.train.CheckpointManager
    restored_from: Optional[str] = None  # the checkpoint restore_latest restored
    # Whether this process writes the run's files (config.yaml, checkpoints, sample grids,
    # metrics.json, TensorBoard) and evaluates: the one process of a one-process run, the
    # chief of a multi-process one (is_writer). The others write nothing in the workdir.
    writer: bool = True

    @property
    def step(self) -> int:
        return int(self.trainer.optimizer.iterations.numpy())

    # what inference/ reads of a model source (inference/pipeline.py)
    @property
    def diffusion(self):
        return self.objective.diffusion

    @property
    def ema(self):
        return self.trainer.ema


def is_writer(cfg: RunConfig) -> bool:
    """``Run.writer`` of a CPU/GPU run: True except on the non-chief workers of
    ``training.strategy: multi_worker`` (``TF_CONFIG`` task.index > 0)."""
    return cfg.training.strategy != "multi_worker" or _no_cluster_error(mw.cluster_for, cfg).is_chief


def _no_cluster_error(fn, cfg: RunConfig):
    try:
        return fn(cfg)
    except mw.ClusterError as e:
        raise RunError(str(e)) from None


def make_strategy(cfg: RunConfig, join: bool = True):
    """The config's ``tf.distribute`` strategy; ``multi_worker`` without ``join`` is the
    default (one-process) strategy."""
    t = cfg.training
    if t.strategy == "default" or (t.strategy == "multi_worker" and not join):
        return tf.distribute.get_strategy()
    if t.strategy == "multi_worker":
        return _no_cluster_error(mw.strategy_for, cfg)
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        devices = [d.name for d in gpus][: t.num_replicas or None]
    else:
        cpus = tf.config.list_logical_devices("CPU")
        want = t.num_replicas or 1
        if len(cpus) < want:
            raise RunError(f"training.num_replicas: {want} replicas need {want} logical CPU devices "
                           f"but {len(cpus)} exist; configure them before TensorFlow starts")
        devices = [d.name for d in cpus[:want]]
    # Collective ops are keyed by (group, instance) for the whole process, and every new
    # MirroredStrategy numbers its groups from _collective_key_base: a second strategy on
    # the same devices (a second run in one process) would reuse the first one's keys and
    # fail with "Shape mismatch in the collective instance". Give each its own range, as
    # TensorFlow's own tests do (tensorflow/python/distribute/strategy_combinations.py).
    tf.distribute.MirroredStrategy._collective_key_base += 100000  # noqa: SLF001
    return tf.distribute.MirroredStrategy(devices)


def set_precision(precision: str) -> None:
    keras.mixed_precision.set_global_policy(precision)


def build_run(cfg: RunConfig, workdir: str, join: bool = False) -> Run:
    """Build model, objective, trainer and checkpoint (nothing is restored yet).

    ``training.strategy: multi_worker`` joins the TF_CONFIG cluster only with ``join``
    (``train``); otherwise (sampling, evaluating, inspecting a run) it is one process."""
    if cfg.training.deterministic:
        tf.config.experimental.enable_op_determinism()
    set_precision(cfg.training.precision)
    strategy = make_strategy(cfg, join)
    if cfg.pipeline.stages > 1 and strategy.num_replicas_in_sync > 1:
        raise ConfigError("training.strategy: data-parallel replicas with pipeline.stages > 1 "
                          "run on IPUs only (ipu.replicas); use strategy 'default' here")
    with strategy.scope():
        objective = DiffusionObjective(cfg.diffusion, cfg.model.num_classes if cfg.data.use_labels else 0,
                                       cfg.training.class_dropout)
        unet, executor = _build_model(cfg, objective)
        trainer = DiffusionTrainer(unet, objective, cfg.training, seed=cfg.run.seed,
                                   global_batch=cfg.training.batch_size, executor=executor)
        trainer.compile(optimizer=make_optimizer(cfg.training),
                        steps_per_execution=cfg.training.steps_per_execution,
                        jit_compile=cfg.training.jit_compile)
        build_optimizer_state(trainer)
    checkpoint = tf.train.Checkpoint(**trainer.checkpoint_objects())
    writer = not join or is_writer(cfg)
    if writer:
        manager = tf.train.CheckpointManager(checkpoint, os.path.join(workdir, CHECKPOINT_DIR),
                                             max_to_keep=cfg.training.keep_checkpoints)
    else:
        manager = mw.ScratchCheckpoints(checkpoint)
    return Run(cfg, workdir, strategy, unet, objective, trainer, checkpoint, manager,
               writer=writer)


def _build_model(cfg: RunConfig, objective: DiffusionObjective):
    """``(unet, executor)``: the executor is None without pipelining; with it, stage s's
    variables are created on stage s's device. Either way the weights start from the
    same seeded initialisation."""
    from ipu_diffusion.models.unet import build_unet

    def build():
        keras.utils.set_random_seed(cfg.run.seed)
        return build_unet(cfg.model)

    if cfg.pipeline.stages <= 1:
        return build(), None
    from ipu_diffusion.pipeline.fallback import build_placed_executor

    return build_placed_executor(build, objective, cfg.pipeline,
                                 global_batch=cfg.training.batch_size,
                                 report_keys=("t",) + objective.sampler_keys)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def restore_latest(run: Run, required: bool, log=_log) -> int:
    """Restore the newest recorded checkpoint whose files read back, falling back past
    damaged ones (``inference.checkpoints.restore_newest``); returns its step (0 when
    there is none). A complete checkpoint that does not fit this model is an error."""
    directory = os.path.join(run.workdir, CHECKPOINT_DIR)
    candidates = ckpts.newest_first(run.manager.latest_checkpoint, run.manager.checkpoints)
    if not candidates:
        if required:
            raise RunError(str(ckpts.no_checkpoint_error(directory)))
        return 0

    def restore(prefix: str) -> None:
        run.checkpoint.restore(prefix).assert_existing_objects_matched()

    try:
        run.restored_from = ckpts.restore_newest(candidates, restore, directory, log)
    except ckpts.WorkdirError as e:
        raise RunError(str(e)) from None
    return run.step


def checkpoint_bytes(run: Run) -> int:
    """Estimated size of one checkpoint: weights, EMA and 2 Adam slots in float32."""
    return CHECKPOINT_VALUES_PER_PARAM * 4 * int(run.unet.keras_model.count_params())


def _fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024.0
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def check_disk_space(run: Run) -> None:
    """Refuse to start when the workdir's disk cannot hold ``keep_checkpoints`` + 1
    checkpoints (the newest is written before the oldest is deleted), counting the
    checkpoint files already there; RunError names the workdir, free and needed space."""
    keep = run.cfg.training.keep_checkpoints
    one = checkpoint_bytes(run)
    directory = os.path.join(run.workdir, CHECKPOINT_DIR)
    existing = 0
    if os.path.isdir(directory):
        existing = sum(e.stat().st_size for e in os.scandir(directory) if e.is_file())
    needed = max(int(one * DISK_MARGIN), int((keep + 1) * one * DISK_MARGIN) - existing)
    free = shutil.disk_usage(run.workdir).free
    if free < needed:
        params = one // (CHECKPOINT_VALUES_PER_PARAM * 4)
        raise RunError(
            f"workdir {run.workdir}: {_fmt_bytes(free)} free but about {_fmt_bytes(needed)} "
            f"needed for checkpoints ({keep} kept + 1 being written, {_fmt_bytes(one)} each: "
            f"weights, EMA and 2 Adam slots of {params:,} float32 parameters, "
            f"x{DISK_MARGIN} margin); free space, lower training.keep_checkpoints or choose "
            "another --workdir")


def start_from_checkpoint(run: Run) -> int:
    """Before training (CPU or IPU): check the disk, restore the newest complete checkpoint
    if any and say which; returns the step to start from."""
    check_disk_space(run)
    start = restore_latest(run, required=False)
    if run.restored_from is not None:
        _log(f"resumed from {run.restored_from} (step {start})")
    return start


def prepare_workdir(cfg: RunConfig, workdir: str, resume: bool) -> None:
    """Create the workdir; refuse to mix runs; write the resolved config; remove what
    interrupted saves left behind."""
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK):
        raise RunError(f"workdir {workdir} is not writable")
    saved = os.path.join(workdir, CONFIG_FILE)
    # Any recorded checkpoint counts, even one whose files are gone or damaged.
    state = tf.train.get_checkpoint_state(os.path.join(workdir, CHECKPOINT_DIR))
    has_ckpt = state is not None and bool(state.model_checkpoint_path)
    if has_ckpt and not resume:
        raise RunError(f"workdir {workdir} already holds a run; pass --resume to continue it "
                       "or choose another --workdir")
    if resume and os.path.exists(saved):
        conflicts = resume_conflicts(load_config(saved), cfg)
        if conflicts:
            changes = "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in conflicts)
            raise RunError(f"workdir {workdir} holds a run trained with other settings that "
                           f"cannot change on resume: {changes}. Resume it with its saved "
                           "config (omit --config and those --set) or start a new run in "
                           "another --workdir")
    save_config(cfg, saved)
    remove_interrupted_saves(workdir)


def remove_interrupted_saves(workdir: str, log=_log) -> None:
    """Delete the ``ckpt-N_temp/`` directories of saves that were killed mid-write.

    TensorFlow writes a shard there and removes the directory after renaming the shard,
    but only when it is empty, and a killed write leaves a temporary file in it for good.
    Nothing ever reads these (only recorded checkpoints are restored); they only hold
    disk space, up to a checkpoint each. One trainer owns a workdir, so at start-up no
    save is in progress.
    """
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if re.fullmatch(r"ckpt-\d+_temp", name) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            log(f"removed {path}, left by an interrupted checkpoint save")


def train(cfg: RunConfig, workdir: Optional[str] = None, resume: bool = False,
          verbose: int = 1, on_start: Optional[Callable[[Run, int], None]] = None
          ) -> Dict[str, Any]:
    """Train to ``cfg.training.steps``; returns (and, on the writer, writes)
    ``metrics.json``'s content. Under ``training.strategy: multi_worker`` every worker runs
    this; only the chief (``Run.writer``) touches the workdir and evaluates. The writer
    calls ``on_start(run, start_step)`` once the run is built and restored, before the
    first step (the CLI's banner)."""
    from ipu_diffusion.evaluation.run_eval import evaluate_run, merge_metrics

    workdir = workdir or cfg.workdir
    if is_writer(cfg):
        prepare_workdir(cfg, workdir, resume)
    run = build_run(cfg, workdir, join=True)
    multi = cfg.training.strategy == "multi_worker"
    t = cfg.training
    try:
        start = _start(run, multi)
        if on_start is not None and run.writer:
            on_start(run, start)
        callbacks, grid, guard, throughput = _callbacks(run, multi)
        began = time.time()
        history = fit_in_chunks(run, _stream(run, multi), start, t.steps, t.log_every,
                                callbacks, verbose if run.writer else 0, lambda: guard.stopped)
    except mw.PEER_ERRORS as e:
        if not multi:
            raise
        chief_dir = os.path.join(workdir, CHECKPOINT_DIR) if run.writer else None
        raise RunError(mw.lost_worker(e, chief_dir)) from None
    wall = time.time() - began
    _raise_if_stopped(run, guard, multi)
    samples = os.path.join(workdir, "samples.png") if grid is not None else None
    if grid is not None and run.step >= t.steps and grid.last != run.step \
            and not os.path.exists(samples):
        grid.set_model(run.trainer)  # killed after the final checkpoint, before the final grid
        grid.write()
    metrics = {
        "steps": run.step, "resumed_from": start, "wall_time_s": round(wall, 2),
        "img_per_s": round(throughput.img_per_s, 2),
        "final_loss": history.get("loss"), "final_grad_norm": history.get("grad_norm"),
        "skipped_nonfinite_steps": int(run.trainer.guard.total.numpy()), "samples": samples,
    }
    if run.trainer.loss_scale is not None:  # mixed_float16: steps skipped to lower the scale
        metrics["loss_scale_overflows"] = int(run.trainer.loss_scale.overflows.numpy())
    if not run.writer:
        metrics["written_by"] = "the chief (worker 0)"  # not this worker: report.summary_lines
        return metrics
    merge_metrics(workdir, metrics)
    if cfg.eval.at_end and cfg.eval.num_samples:
        e = cfg.eval
        metrics["eval"] = evaluate_run(run, e.num_samples, e.sampler, e.steps, e.eta,
                                       seed=cfg.run.seed, verbose=bool(verbose))
    return metrics


def _raise_if_stopped(run: Run, guard: cb.StopGuard, multi: bool) -> None:
    """RunError after a non-finite streak, Interrupted after a signal (on every worker)."""
    newest = run.manager.latest_checkpoint if run.writer else "the chief's newest"
    if run.trainer.abort_reason is not None:
        raise RunError(f"training stopped: {run.trainer.abort_reason}; the newest checkpoint "
                       f"({newest}) is the last good state. Lower training.lr or check the "
                       "data, then resume with --resume" + (" on every worker" if multi else ""))
    signum = guard.stop_signal or guard.signal_received  # or one after the last step
    if not signum:
        return
    by = "" if guard.signal_received else " (received by another worker)"
    if run.writer:
        saved = f"checkpoint saved in {os.path.join(run.workdir, CHECKPOINT_DIR)}"
    else:
        saved = "the chief saved a checkpoint"
    again = f"python -m ipu_diffusion train --workdir {run.workdir} --resume"
    if multi:  # only the chief's workdir holds config.yaml
        again = f"restart every worker with its TF_CONFIG, --config and --resume ({again})"
    raise Interrupted(f"stopped by signal {signum}{by} at step {run.step}; {saved}. "
                      f"Resume: {again}", signum)


def _start(run: Run, multi: bool) -> int:
    """Restore the newest checkpoint (the writer only) and return the step to start from;
    under multi_worker every worker then holds the chief's state."""
    start = start_from_checkpoint(run) if run.writer else 0
    if multi and mw.chief_says(run.strategy, run.restored_from is not None, run.writer):
        # the chief's restored state on every worker (a new run's state agrees already:
        # the strategy gives every variable the chief's initial value)
        mw.broadcast_from_chief(run.strategy, mw.state_variables(run))
        start = run.step
    return start


def _stream(run: Run, multi: bool):
    """``step -> dataset`` from that step on; under multi_worker each worker builds only
    its replicas' slices of every global batch."""
    from ipu_diffusion.data import make_dataset

    cfg = run.cfg
    batch, seed = cfg.training.batch_size, cfg.run.seed
    if not multi:
        return lambda step: make_dataset(cfg, batch, seed, start_step=step)
    return lambda step: mw.distributed_stream(
        run.strategy, lambda slices: make_dataset(cfg, batch, seed, start_step=step, slices=slices))


def _callbacks(run: Run, multi: bool):
    """``(callbacks, grid or None, guard, throughput)``: checkpoints on every process
    (non-writers save into scratch directories), TensorBoard and sample grids
    (``training.num_sample_images`` > 0) on the writer only."""
    from ipu_diffusion.inference.generate import ema_unet, sample_images
    from ipu_diffusion.visualize import save_image_grid

    cfg, t, workdir = run.cfg, run.cfg.training, run.workdir
    throughput = cb.ThroughputCallback(t.batch_size)
    guard = cb.StopGuard(t.max_nonfinite_steps, mw.SignalAgreement(run.strategy) if multi else None)
    ckpt = cb.CheckpointCallback(run.manager, t.checkpoint_every)
    if not run.writer:
        return [throughput, ckpt, guard], None, guard, throughput
    tb = cb.TensorBoardCallback(os.path.join(workdir, "tensorboard"), t.log_every)
    if not t.num_sample_images:
        return [throughput, tb, ckpt, guard], None, guard, throughput
    if multi:  # Keras 2 runs callbacks in the strategy's scope: make no variables there
        ema_unet(run)
    grid = cb.SampleGridCallback(
        workdir, t.sample_every,
        lambda step: sample_images(run, t.num_sample_images, seed=cfg.run.seed),
        # a conditional run cycles the labels 0..K-1: one column per class
        lambda images, path: save_image_grid(images, path, ncols=cfg.model.num_classes or None),
        t.steps, tb)
    return [throughput, tb, ckpt, grid, guard], grid, guard, throughput


def fit_in_chunks(run: Run, stream_from, start: int, total: int, chunk: int, callbacks,
                  verbose: int, stopped=lambda: False) -> Dict[str, float]:
    """``fit`` with one Keras "epoch" per ``chunk`` steps (one progress bar each).

    A start or end that is not a multiple of ``chunk`` (a resume after an interrupt, or
    ``steps`` not a multiple of ``log_every``) gets its own short ``fit`` call; each call
    reads the stream from the current step, so the data order is unchanged.
    """
    segments = []
    head_end = min(total, -(-start // chunk) * chunk)
    body_end = max(head_end, total // chunk * chunk)
    if head_end > start:
        segments.append((start, head_end, head_end - start))
    if body_end > head_end:
        segments.append((head_end, body_end, chunk))
    if total > body_end:
        segments.append((body_end, total, total - body_end))
    logs: Dict[str, float] = {}
    for begin, end, per_epoch in segments:
        h = run.trainer.fit(stream_from(begin), initial_epoch=begin // per_epoch,
                            epochs=end // per_epoch, steps_per_epoch=per_epoch,
                            callbacks=callbacks, verbose=verbose, shuffle=False)
        logs = {k: float(v[-1]) for k, v in h.history.items()}
        if stopped():
            break
    return logs
