"""What ``train`` tells the user: a banner before the first step (``banner_lines``, from
the built run) and a summary at the end (``summary_lines``, from the metrics dict that
``training.run.train`` returns and writes into ``metrics.json``). Formatting only."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from ipu_diffusion.config import RunConfig

WIDTH = 10  # the label column


def _row(label: str, value: str) -> str:
    return f"  {label:<{WIDTH}} {value}"


def _short(device: str) -> str:
    """``/job:localhost/replica:0/task:0/device:CPU:1`` -> ``CPU:1``."""
    return device.rsplit("device:", 1)[-1]


def data_line(cfg: RunConfig) -> str:
    """Source, where it is, and how many training images (files, for a folder: broken
    ones are skipped, and counted, when the data loads)."""
    d = cfg.data
    if d.source == "folder":
        from ipu_diffusion.data.folder import find_images

        return f"folder {d.path}: {len(find_images(d.path)):,} image files"
    from ipu_diffusion.data.dataset import load_raw

    images, labels = load_raw(cfg, "train")
    where = {"digits": "scikit-learn 8x8 digits, train split", "npz": d.path,
             "tfds": f"{d.tfds_name} in {d.path}"}[d.source]
    labelled = ", labelled" if d.use_labels and labels is not None else ""
    return f"{d.source} ({where}): {len(images):,} images{labelled}"


def _default_device() -> str:
    """Where the default strategy runs ops: the first GPU, else the first CPU."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return (gpus or tf.config.list_logical_devices("CPU"))[0].name


def devices_line(run: Any) -> str:
    """Strategy and devices; for a pipeline, each stage's device."""
    cfg = run.cfg
    strategy = cfg.training.strategy
    try:
        devices = [_short(d) for d in run.strategy.extended.worker_devices]
    except (AttributeError, RuntimeError):  # the default strategy: TensorFlow's placement
        devices = [_short(_default_device())]
    text = f"{strategy}, {run.strategy.num_replicas_in_sync} replica(s)"
    if devices:
        text += f" on {', '.join(devices)}"
    if cfg.pipeline.stages > 1:
        from ipu_diffusion.pipeline.devices import stage_devices

        stages = "; ".join(f"{s}: {_short(d)}" for s, d in enumerate(stage_devices(cfg.pipeline)))
        text += (f"; pipeline of {cfg.pipeline.stages} stages ({stages}), "
                 f"{cfg.pipeline.microbatches} microbatches")
    return text


def ipu_devices_line(plan: Any) -> str:
    """``train-ipu``'s devices: replicas, IPUs, and each pipeline stage's IPU."""
    text = (f"IPU, {plan.replicas} replica(s) x {plan.ipus_per_replica} IPU(s) = "
            f"{plan.total_ipus} of {plan.system_ipus} IPUs")
    if plan.pipelined:
        stages = "; ".join(f"{s}: IPU {d}" for s, d in enumerate(plan.device_mapping))
        text += (f"; pipeline of {plan.num_stages} stages ({stages}), {plan.microbatches} "
                 f"microbatches, schedule {plan.schedule}")
    return text


def banner_lines(run: Any, start: int, config_path: Optional[str],
                 devices: Optional[str] = None) -> List[str]:
    """The lines printed before the first step of ``train`` (``devices``: the devices
    line, default :func:`devices_line` of the run's strategy)."""
    cfg, t, m = run.cfg, run.cfg.training, run.cfg.model
    resumed = (f"yes, from {run.restored_from} (step {start:,})" if run.restored_from
               else "no, a new run")
    return [f"train {cfg.run.name}",
            _row("config", os.path.abspath(config_path) if config_path else "(none)"),
            _row("data", data_line(cfg)),
            _row("images", f"{m.image_size}x{m.image_size}x{m.in_channels}"),
            _row("model", f"U-Net, {run.unet.count_params():,} parameters (ch {m.ch}, "
                          f"ch_mult {list(m.ch_mult)})"),
            _row("steps", f"{t.steps:,} of batch {t.batch_size}, lr {t.lr:g}"),
            _row("precision", t.precision),
            _row("devices", devices or devices_line(run)),
            _row("workdir", os.path.abspath(run.workdir)),
            _row("resumed", resumed)]


def _num(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def scores_text(result: Dict[str, Any]) -> str:
    """FID, IS, precision and recall, each next to its real-data floor."""
    pairs = [("FID", "fid", 2), ("IS", "inception_score", 2), ("precision", "precision", 3),
             ("recall", "recall", 3)]
    return ", ".join(f"{name} {_num(result.get(key), d)} "
                     f"(floor {_num(result.get('floor_' + key), d)})" for name, key, d in pairs)


def _samples_text(result: Dict[str, Any]) -> str:
    bf16 = " bfloat16" if result.get("sampling_precision") == "bfloat16" else ""
    return (f"{result.get('num_samples', 0):,}{bf16} {result.get('sampler', '')}-"
            f"{result.get('steps', '')} samples, {result.get('feature_net')}")


def eval_summary(result: Dict[str, Any]) -> str:
    """An evaluation in one line: scores, near copies, bits/dim, what was sampled."""
    parts = [scores_text(result)] if result.get("fid") is not None else \
        [result.get("note", "no FID (no feature network)")]
    if "near_copies" in result:
        parts.append(f"near copies {100 * result['near_copies']:.1f}%")
    if "bpd" in result:
        parts.append(f"{result['bpd']:.3f} bits/dim on {result['bpd_images']} "
                     f"{result['bpd_split']} images")
    return "; ".join(parts) + f" ({_samples_text(result)}, checkpoint step " \
        f"{result.get('checkpoint_step', '?')})"


def eval_lines(result: Dict[str, Any]) -> List[str]:
    """FID, IS, precision and recall next to the real-data floor, and near copies."""
    if result.get("fid") is None:
        return [_row("eval", result.get("note", "no FID (no feature network)"))]
    lines = [_row("eval", _samples_text(result)), _row("", scores_text(result))]
    if "near_copies" in result:
        lines.append(_row("", f"near copies of training images: {100 * result['near_copies']:.1f}%"))
    return lines


def summary_lines(metrics: Dict[str, Any], workdir: str) -> List[str]:
    """The lines printed after ``train``: steps, time, rate, loss, evaluation, files."""
    loss = metrics.get("final_loss")
    done = (f"done: {metrics['steps']} steps in {metrics['wall_time_s']} s, "
            f"{metrics['img_per_s']} img/s, final loss {_num(loss, 4)}")
    if metrics.get("resumed_from"):
        done += f" (resumed at step {metrics['resumed_from']:,})"
    lines = [done]
    if "eval" in metrics:
        lines += eval_lines(metrics["eval"])
    if metrics.get("samples"):
        lines.append(_row("samples", metrics["samples"]))
    if "eval" in metrics:
        lines.append(_row("", os.path.join(workdir, "eval_samples.png") + " (evaluation)"))
    if metrics.get("written_by"):  # the other workers or instances of a distributed run
        lines.append(_row("metrics", f"written by {metrics['written_by']}"))
    else:
        lines.append(_row("metrics", os.path.join(workdir, "metrics.json")))
    return lines
