"""Command line: ``python -m ipu_diffusion {train,sample,eval,train-ipu,train-classifier,
reconstruct,interpolate,import-diffusers,export,bench} ...`` (arguments: ``cli_parser.py``).

Errors the user can fix (config, data, run directory) print one line and exit with
status 2; they never show a traceback.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from typing import List, Optional, Sequence, Tuple

from ipu_diffusion.config import ConfigError, ConfigWarning, RunConfig, load_config
from ipu_diffusion.configs import resolve_config
from ipu_diffusion.cli_parser import parser as _parser
from ipu_diffusion.quiet import QuietStart, wants_verbose

EXIT_USAGE = 2

def _load_for_train(args) -> Tuple[RunConfig, str]:
    """The run config and the YAML file it came from."""
    config = args.config
    if config is None:
        saved = os.path.join(args.workdir or "", "config.yaml")
        if args.resume and args.workdir and os.path.exists(saved):
            config = saved
        else:
            raise ConfigError("train needs --config FILE or NAME (or --resume with a --workdir "
                              "that holds config.yaml)")
    else:
        config = resolve_config(config)
    return load_config(config, args.overrides), config


def configure_devices(cfg: RunConfig) -> None:
    """Logical CPU devices for pipeline stages or CPU replicas, before TensorFlow starts."""
    from ipu_diffusion.pipeline.devices import configure_logical_cpus, prepare_devices

    if cfg.pipeline.stages > 1:
        prepare_devices(cfg.pipeline)
    if cfg.training.strategy == "mirrored" and cfg.training.num_replicas > 1:
        configure_logical_cpus(cfg.training.num_replicas)


def cmd_train(args) -> int:
    cfg, path = _load_for_train(args)
    configure_devices(cfg)
    from ipu_diffusion.training import report
    from ipu_diffusion.training.run import train

    workdir = args.workdir or cfg.workdir

    def banner(run, start: int) -> None:
        print("\n".join(report.banner_lines(run, start, path)), flush=True)

    metrics = train(cfg, workdir, resume=args.resume, on_start=banner)
    print("\n".join(report.summary_lines(metrics, workdir)), flush=True)
    return 0


def _check_guidance_flags(args) -> None:
    """Flag combinations that cannot work, as one clear error before anything loads."""
    from ipu_diffusion.diffusion.guidance import GuidanceError

    if args.scale is not None and args.guidance is None:
        raise GuidanceError("--scale: needs --guidance cfg or --guidance classifier")
    if args.classifier and args.guidance != "classifier":
        raise GuidanceError("--classifier: only used with --guidance classifier")
    if args.guidance == "classifier" and not args.classifier:
        raise GuidanceError("--guidance classifier: needs --classifier DIR (written by "
                            "python -m ipu_diffusion train-classifier)")


def cmd_sample(args) -> int:
    import numpy as np

    from ipu_diffusion.diffusion.guidance import cycle_labels
    from ipu_diffusion.inference.generate import sample_images
    from ipu_diffusion.visualize import save_image_grid

    _check_guidance_flags(args)
    classifier = None
    if args.classifier:
        from ipu_diffusion.inference.classifier import load_classifier

        classifier = load_classifier(args.classifier)
    run = _restore(args.workdir, args=args)
    labels = None
    classes = classifier.num_classes if classifier is not None else run.cfg.model.num_classes
    if args.label is not None:
        labels = cycle_labels(args.num, classes, args.label)
    images = sample_images(run, args.num, args.seed, sampler=args.sampler, steps=args.steps,
                           eta=args.eta, progress=True, labels=labels, guidance=args.guidance,
                           scale=1.0 if args.scale is None else args.scale,
                           classifier=classifier)
    tag = f"_{args.guidance}{args.scale if args.scale is not None else 1.0:g}" if args.guidance else ""
    prefix = args.out or os.path.join(args.workdir, f"sample_{args.sampler}{args.steps}{tag}")
    cycled = args.label is None and classes > 0  # labels 0..K-1 cycled: a column per class
    save_image_grid(images, prefix + ".png", ncols=classes if cycled else None)
    np.savez_compressed(prefix + ".npz", images=images, step=run.step)
    print(f"wrote {prefix}.png and {prefix}.npz ({len(images)} images, checkpoint step {run.step})")
    return 0


def cmd_import_diffusers(args) -> int:
    from ipu_diffusion.inference.diffusers_import import load_weights, read_diffusers_dir

    imported = read_diffusers_dir(args.model_dir)  # every check before the workdir is touched
    cfg = imported.run_config(args.overrides)
    from ipu_diffusion.inference.checkpoints import CONFIG_FILE
    from ipu_diffusion.training.pretrained import start_run_from_weights

    configure_devices(cfg)
    path, params = start_run_from_weights(cfg, args.workdir,
                                          lambda unet: load_weights(unet, imported.tensors))
    for note in imported.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {os.path.join(args.workdir, CONFIG_FILE)} and {path}: {args.model_dir} "
          f"({params:,} parameters) as step 0, weights and EMA")
    return 0


def cmd_export(args) -> int:
    from ipu_diffusion.inference.export import export_saved_model

    pipe = _restore(args.workdir)
    out = export_saved_model(pipe, args.out or os.path.join(args.workdir, "savedmodel"))
    denoise = "denoise(x_t, t, y)" if pipe.cfg.model.num_classes else "denoise(x_t, t)"
    print(f"wrote {out}: signatures {denoise} and sample(num, steps, seed) of the EMA network "
          f"at checkpoint step {pipe.step}")
    return 0


def cmd_train_classifier(args) -> int:
    from ipu_diffusion.training.classifier import RECORD_FILE, WEIGHTS_FILE, train_classifier

    cfg = load_config(resolve_config(args.config), args.overrides)
    record = train_classifier(cfg, args.workdir, steps=args.steps, batch_size=args.batch_size,
                              lr=args.lr)
    accuracy = ", ".join(f"t={t} {100 * a:.1f}%" for t, a in record["heldout_accuracy_at_t"].items())
    print(f"wrote {os.path.join(args.workdir, WEIGHTS_FILE)} and "
          f"{os.path.join(args.workdir, RECORD_FILE)}: {record['steps']} steps in "
          f"{record['train_seconds']} s, held-out {record['heldout_split']} accuracy {accuracy}")
    return 0


def cmd_reconstruct(args) -> int:
    from ipu_diffusion.evaluation.run_eval import merge_metrics, metrics_path
    from ipu_diffusion.inference.control import reconstruct_run

    run = _restore(args.workdir)
    result = reconstruct_run(run, args.num, args.steps, args.seed, args.out or "")
    merge_metrics(args.workdir, {"reconstruct": result})
    print(f"wrote {result['png']}: {result['num']} held-out {result['split']} images over "
          f"their DDIM-{result['steps']} reconstructions, mse {result['mse']:.4g}, "
          f"PSNR {result['psnr_db']:.1f} dB (checkpoint step {result['checkpoint_step']}; "
          f"also in {metrics_path(args.workdir)})")
    return 0


def cmd_interpolate(args) -> int:
    from ipu_diffusion.inference.control import interpolate_run

    run = _restore(args.workdir)
    result = interpolate_run(run, args.steps, args.frames, args.pair, args.seed, args.out or "")
    i, j = result["pair"]
    print(f"wrote {result['png']}: held-out {result['split']} images {i} and {j}, "
          f"{result['frames']} DDIM-{result['steps']} frames between them, end-frame mse "
          + " and ".join(f"{v:.4g}" for v in result["endpoint_mse"])
          + f" (checkpoint step {result['checkpoint_step']})")
    return 0


def _restore(workdir: str, overrides: Sequence[str] = (), args=None):
    """The run's EMA model (``inference.Pipeline``); ``args``: the checkpoint and
    precision flags of sample and eval."""
    from ipu_diffusion.inference import Pipeline

    step = None
    if args is not None:
        step = args.checkpoint_step
        if args.precision:
            overrides = list(overrides) + [f"eval.precision={args.precision}"]
    return Pipeline.from_workdir(workdir, overrides, step=step)


def cmd_eval(args) -> int:
    overrides = [f"eval.inception_path={args.inception}"] if args.inception else []
    run = _restore(args.workdir, overrides, args)
    from ipu_diffusion.evaluation.run_eval import evaluate_run, metrics_path
    from ipu_diffusion.training.report import eval_summary

    e = run.cfg.eval
    prefix = args.out or os.path.join(args.workdir, "eval_samples")
    result = evaluate_run(run, args.num_samples or e.num_samples, args.sampler or e.sampler,
                          args.steps or e.steps, e.eta if args.eta is None else args.eta,
                          seed=args.seed, bpd_images=args.bpd, grid=prefix + ".png")
    wrote = [prefix + ".png"]
    if args.out:
        wrote.append(prefix + ".json")
        with open(wrote[-1], "w") as f:
            json.dump(result, f, indent=2, default=str)
    wrote.append(metrics_path(args.workdir))
    print(f"wrote {', '.join(wrote)}: {eval_summary(result)}")
    return 0


def cmd_train_ipu(args) -> int:
    from ipu_diffusion.pipeline import ipu
    from ipu_diffusion.training import ipu_train

    try:
        ipu.require_sdk(args.config)
    except ipu.SDKMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from ipu_diffusion.pipeline.ipu_plan import describe
    from ipu_diffusion.training import report

    cfg, path = _load_for_train(args)
    workdir = args.workdir or cfg.workdir

    def banner(run, plan, start: int) -> None:
        lines = report.banner_lines(run, start, path, devices=report.ipu_devices_line(plan))
        print("\n".join(lines + ["", describe(plan)]), flush=True)

    metrics = ipu_train.train(cfg, workdir, resume=args.resume, on_start=banner)
    print("\n".join(report.summary_lines(metrics, workdir)), flush=True)
    return 0


def cmd_bench(args) -> int:
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "run_all.py")
    if not os.path.isfile(script):
        raise ConfigError(f"bench: {script} not found; the benchmarks ship with the source "
                          "checkout, not with the installed package")
    cmd = [sys.executable, script] + (["--only", args.only] if args.only else []) + \
        (["--summary-only"] if args.summary_only else [])
    env = dict(os.environ, FULL="1" if args.full else "")
    return subprocess.call(cmd, env=env)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A ConfigWarning as one ``warning: ...`` line (it names the key and file already)."""
    if issubclass(category, ConfigWarning):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: Optional[List[str]] = None, quiet_start: Optional[bool] = None) -> int:
    """The command line; returns the exit status. ``quiet_start`` (default: only when
    ``argv`` is None, i.e. this process is the command) filters TensorFlow's start-up
    lines out of stderr (``ipu_diffusion/quiet.py``) unless ``--verbose``."""
    args = _parser().parse_args(argv)
    if quiet_start is None:
        quiet_start = argv is None
    if quiet_start and not wants_verbose(args.verbose):
        with QuietStart():  # before TensorFlow is imported
            return _run(args)
    return _run(args)


# The exceptions that are the user's to fix (exit 2), by module: looked up only among
# the modules already imported, so an early config error does not wait for TensorFlow.
USAGE_ERRORS = (("ipu_diffusion.config", "ConfigError"), ("ipu_diffusion.data.common", "DataError"),
                ("ipu_diffusion.diffusion.guidance", "GuidanceError"),
                ("ipu_diffusion.inference.checkpoints", "WorkdirError"),
                ("ipu_diffusion.training.run", "RunError"))


def _loaded(pairs) -> tuple:
    return tuple(getattr(sys.modules[m], name) for m, name in pairs if m in sys.modules)


def _run(args) -> int:
    warnings.formatwarning = _format_warning
    handlers = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval,
                "train-ipu": cmd_train_ipu, "train-classifier": cmd_train_classifier,
                "reconstruct": cmd_reconstruct, "interpolate": cmd_interpolate,
                "bench": cmd_bench, "import-diffusers": cmd_import_diffusers,
                "export": cmd_export}
    try:
        return handlers[args.command](args)
    except Exception as e:  # noqa: BLE001 (re-raised unless it is a usage error or a stop)
        if isinstance(e, _loaded(USAGE_ERRORS)):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(e, _loaded([("ipu_diffusion.training.run", "Interrupted")])):
            print(str(e), file=sys.stderr)
            return 128 + e.signum
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
