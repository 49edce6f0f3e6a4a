"""The command line's argument parser (``python -m ipu_diffusion --help``); ``cli.py``
runs the commands."""
from __future__ import annotations

import argparse
import os
import sys

from ipu_diffusion.config import SAMPLERS, SAMPLING_PRECISIONS
from ipu_diffusion.configs import builtin_names

VERBOSE_HELP = ("show TensorFlow's C++ start-up log lines (oneDNN, CUDA, absl), hidden by "
                "default; or set IPU_DIFFUSION_VERBOSE=1")


def _prog() -> str:
    """``ipu-diffusion`` when run as the console script, else ``python -m ipu_diffusion``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name == "ipu-diffusion" else "python -m ipu_diffusion"


def parser() -> argparse.ArgumentParser:
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
    s.add_argument("--eta", type=float, default=None, help="DDIM eta: 0 deterministic, 1 "
                   "DDPM-like (default: eval.eta)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--out", help="output prefix (default: <workdir>/sample_<sampler><steps>)")
    _guidance_flags(s)
    _model_flags(s)

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
    _model_flags(e)
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


def _model_flags(p) -> None:
    """Which checkpoint and in what precision: sample and eval."""
    p.add_argument("--checkpoint-step", type=int, default=None, metavar="N",
                   help="the recorded checkpoint of step N (default: the newest)")
    p.add_argument("--precision", choices=SAMPLING_PRECISIONS, default=None,
                   help="the network's arithmetic (default: eval.precision); bfloat16 is "
                   "faster on CPUs with AVX512-BF16/AMX, its samples are not float32's")


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
