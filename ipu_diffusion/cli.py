"""Command line: ``python -m ipu_diffusion {train,sample,eval,train-ipu,train-classifier,
reconstruct,interpolate,bench} ...``.

Errors the user can fix (config, data, run directory) print one line and exit with
status 2; they never show a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import List, Optional, Sequence, Tuple

from ipu_diffusion.config import SAMPLERS, ConfigError, ConfigWarning, RunConfig, load_config
from ipu_diffusion.configs import builtin_names, resolve_config
from ipu_diffusion.quiet import QuietStart, wants_verbose

EXIT_USAGE = 2
VERBOSE_HELP = ("show TensorFlow's C++ start-up log lines (oneDNN, CUDA, absl), hidden by "
                "default; or set IPU_DIFFUSION_VERBOSE=1")


def _prog() -> str:
    """``ipu-diffusion`` when run as the console script, else ``python -m ipu_diffusion``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name == "ipu-diffusion" else "python -m ipu_diffusion"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=_prog(),
                                description="Train, sample and evaluate diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML run config")
    t.add_argument("--config", help="YAML run config file, or the name of a built-in one "
                   f"({', '.join(builtin_names())}); with --resume it defaults to the config "
                   "saved in the workdir")
    t.add_argument("--workdir", help="run directory for checkpoints, samples, logs "
                   "(default: runs/<run.name>)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.steps=500 (repeatable)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in the workdir")

    s = sub.add_parser("sample", help="sample images from a trained run (EMA weights)")
    s.add_argument("--workdir", required=True, help="run directory written by train")
    s.add_argument("--num", type=int, default=64, help="number of images")
    s.add_argument("--sampler", choices=SAMPLERS, default="ddim",
                   help="ancestral DDPM, DDIM (Song et al. 2021) or DPM-Solver++(2M) "
                   "(Lu et al. 2022)")
    s.add_argument("--steps", type=int, default=50, help="sampling steps (respaced)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--out", help="output prefix (default: <workdir>/sample_<sampler><steps>)")
    _guidance_flags(s)

    x = sub.add_parser("export", help="write a TensorFlow SavedModel of a trained run's EMA "
                       "network (signatures denoise and sample) that loads without this package")
    x.add_argument("--workdir", required=True, help="run directory written by train")
    x.add_argument("--out", metavar="SAVEDMODEL",
                   help="SavedModel directory (default: <workdir>/savedmodel)")

    e = sub.add_parser("eval", help="sample with the EMA weights and compute FID/KID/IS/"
                       "precision/recall (and bits/dim) into <workdir>/metrics.json")
    e.add_argument("--workdir", required=True, help="run directory written by train")
    e.add_argument("--num-samples", type=int, default=None,
                   help="generated images to score (default: eval.num_samples)")
    e.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="default: eval.sampler")
    e.add_argument("--steps", type=int, default=None, help="default: eval.steps")
    e.add_argument("--eta", type=float, default=None, help="DDIM eta (default: eval.eta)")
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.add_argument("--bpd", type=int, default=0, metavar="N",
                   help="also compute bits/dim on N held-out images (all timesteps)")
    e.add_argument("--inception", default=None,
                   help="FID Inception graph (.pb) for non-digits data; or set "
                   "$IPU_DIFFUSION_INCEPTION")

    i = sub.add_parser("train-ipu", help="train on Graphcore IPUs (needs the Poplar SDK)")
    for action in t._actions[1:]:  # the same flags as train
        i._add_action(action)
    _control_parsers(sub)
    _import_parser(sub)

    b = sub.add_parser("bench", help="throughput, MFU, sampling, pipeline and memory "
                       "benchmarks (benchmarks/run_all.py of a source checkout): JSON and PNG "
                       "charts in benchmarks/results/")
    b.add_argument("--full", action="store_true", help="the long version (default: quick, "
                   "~10 minutes on 2 cores)")
    b.add_argument("--only", default="", help="comma-separated subset, e.g. sampling,memory")
    b.add_argument("--summary-only", action="store_true",
                   help="re-check the targets from existing results")
    e.add_argument("--out", help="output prefix: PREFIX.png (64 of the samples) and PREFIX.json "
                   "(the scores); default <workdir>/eval_samples.png. The scores also go into "
                   "<workdir>/metrics.json")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    for command in sub.choices.values():  # also after the command: train ... --verbose
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                             help=VERBOSE_HELP)
    return p


def _guidance_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--label", type=int, default=None,
                   help="class of every sample (default: 0..K-1 cycled) for a class-conditional "
                   "run or classifier guidance")
    s.add_argument("--guidance", choices=["cfg", "classifier"], default=None,
                   help="cfg: classifier-free guidance (Ho & Salimans 2022); classifier: "
                   "gradient of a noise-aware classifier (Dhariwal & Nichol 2021)")
    s.add_argument("--scale", type=float, default=None,
                   help="guidance scale: cfg weight w (1 = conditional, 0 = unconditional) or "
                   "the classifier gradient scale s (default 1)")
    s.add_argument("--classifier", default=None, metavar="DIR",
                   help="directory written by train-classifier (for --guidance classifier)")


def _control_parsers(sub) -> None:
    c = sub.add_parser("train-classifier", help="train a noise-aware classifier p(y | x_t, t) "
                       "for classifier guidance")
    c.add_argument("--config", required=True, help="YAML run config file or built-in name "
                   "(its model, diffusion and data sections; model.num_classes > 0)")
    c.add_argument("--workdir", required=True, help="directory for the classifier's weights "
                   "and classifier.json")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    c.add_argument("--steps", type=int, default=500, help="Adam steps")
    c.add_argument("--batch-size", type=int, default=None, help="default: training.batch_size")
    c.add_argument("--lr", type=float, default=None, help="default: training.lr")

    r = sub.add_parser("reconstruct", help="DDIM-encode held-out images and decode them back; "
                       "report the MSE and write a PNG of originals over reconstructions")
    r.add_argument("--workdir", required=True, help="run directory written by train")
    r.add_argument("--num", type=int, default=16, help="held-out images")
    r.add_argument("--steps", type=int, default=50, help="DDIM steps each way")
    r.add_argument("--seed", type=int, default=0, help="which images")
    r.add_argument("--out", help="output prefix (default: <workdir>/reconstruct_ddim<steps>)")

    n = sub.add_parser("interpolate", help="slerp between the DDIM latents of two held-out "
                       "images; write a PNG strip")
    n.add_argument("--workdir", required=True, help="run directory written by train")
    n.add_argument("--steps", type=int, default=50, help="DDIM steps each way")
    n.add_argument("--frames", type=int, default=8, help="decoded frames, both ends included")
    n.add_argument("--pair", type=int, nargs=2, default=None, metavar=("I", "J"),
                   help="held-out image indices (default: two of different classes by --seed)")
    n.add_argument("--seed", type=int, default=0, help="which images")
    n.add_argument("--out", help="output prefix (default: <workdir>/interpolate_ddim<steps>)")


def _import_parser(sub) -> None:
    d = sub.add_parser("import-diffusers", help="import a diffusers UNet2DModel of the DDPM "
                       "family (e.g. google/ddpm-cifar10-32) into a new run directory that "
                       "sample, eval and train --resume accept")
    d.add_argument("--model-dir", required=True, help="local diffusers folder: config.json and "
                   "diffusion_pytorch_model.safetensors (and scheduler_config.json), or a "
                   "pipeline folder with unet/ and scheduler/")
    d.add_argument("--workdir", required=True, help="the new run directory (config.yaml, "
                   "checkpoints/ckpt-0 with the weights as the model and its EMA)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set a key of the new run's config (repeatable), e.g. the data to "
                   "fine-tune on: --set data.source=npz --set data.path=cifar10.npz; not the "
                   "keys that define the network")


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
    run, step = _restore(args.workdir)
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
    np.savez_compressed(prefix + ".npz", images=images, step=step)
    print(f"wrote {prefix}.png and {prefix}.npz ({len(images)} images, checkpoint step {step})")
    return 0


def cmd_import_diffusers(args) -> int:
    from ipu_diffusion.inference.diffusers_import import load_weights, read_diffusers_dir

    imported = read_diffusers_dir(args.model_dir)  # every check before the workdir is touched
    cfg = imported.run_config(args.overrides)
    from ipu_diffusion.inference.pipeline import CONFIG_FILE
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

    pipe, step = _restore(args.workdir)
    out = export_saved_model(pipe, args.out or os.path.join(args.workdir, "savedmodel"))
    denoise = "denoise(x_t, t, y)" if pipe.cfg.model.num_classes else "denoise(x_t, t)"
    print(f"wrote {out}: signatures {denoise} and sample(num, steps, seed) of the EMA network "
          f"at checkpoint step {step}")
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

    run, _ = _restore(args.workdir)
    result = reconstruct_run(run, args.num, args.steps, args.seed, args.out or "")
    merge_metrics(args.workdir, {"reconstruct": result})
    print(f"wrote {result['png']}: {result['num']} held-out {result['split']} images over "
          f"their DDIM-{result['steps']} reconstructions, mse {result['mse']:.4g}, "
          f"PSNR {result['psnr_db']:.1f} dB (checkpoint step {result['checkpoint_step']}; "
          f"also in {metrics_path(args.workdir)})")
    return 0


def cmd_interpolate(args) -> int:
    from ipu_diffusion.inference.control import interpolate_run

    run, _ = _restore(args.workdir)
    result = interpolate_run(run, args.steps, args.frames, args.pair, args.seed, args.out or "")
    i, j = result["pair"]
    print(f"wrote {result['png']}: held-out {result['split']} images {i} and {j}, "
          f"{result['frames']} DDIM-{result['steps']} frames between them, end-frame mse "
          + " and ".join(f"{v:.4g}" for v in result["endpoint_mse"])
          + f" (checkpoint step {result['checkpoint_step']})")
    return 0


def _restore(workdir: str, overrides: Sequence[str] = ()):
    """The run's EMA model (``inference.Pipeline``) and its checkpoint step."""
    from ipu_diffusion.inference import Pipeline

    pipe = Pipeline.from_workdir(workdir, overrides)
    return pipe, pipe.step


def cmd_eval(args) -> int:
    overrides = [f"eval.inception_path={args.inception}"] if args.inception else []
    run, _ = _restore(args.workdir, overrides)
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
                ("ipu_diffusion.inference.pipeline", "WorkdirError"),
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
