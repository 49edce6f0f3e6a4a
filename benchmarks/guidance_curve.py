"""Guidance curves on a trained class-conditional digits run: label agreement and
diversity against the guidance scale, for classifier-free guidance (Ho & Salimans 2022)
and classifier guidance (Dhariwal & Nichol 2021), plus DPM-Solver++ vs DDIM.

    python benchmarks/guidance_curve.py --workdir runs/digits_cond \
        --classifier runs/digits_cond/classifier --num 500
    python benchmarks/guidance_curve.py --workdir runs/digits_cond \
        --classifier runs/digits_cond/classifier --num 300 --fresh \
        --settings cfg0,cfg1,cfg3,classifier3_ddim,classifier3_ddpm,dpm_solver20

For each setting it samples ``--num`` images with the labels 0..9 cycled and scores them
with the digits classifier (evaluation/digits_classifier.py): ``label_agreement`` (its
argmax equals the requested label), FID/precision/recall against the test split, and
``within_class_var``: the mean over classes of the total variance of the classifier's
features among samples requested with that class (diversity; the real test images give
the reference value). Writes ``<out>.json`` and ``<out>.png`` (agreement and diversity
vs scale) and a sample grid per setting under ``<out>_grids/``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ipu_diffusion.cli import _restore  # noqa: E402
from ipu_diffusion.diffusion.guidance import cycle_labels  # noqa: E402
from ipu_diffusion.evaluation.digits_classifier import load_digits_classifier  # noqa: E402
from ipu_diffusion.evaluation.evaluate import digits_quality  # noqa: E402
from ipu_diffusion.inference.generate import sample_images  # noqa: E402
from ipu_diffusion.visualize import save_image_grid  # noqa: E402

METRICS = ("label_agreement", "fid", "precision", "recall")


def within_class_var(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of trace Cov(features | requested class)."""
    return float(np.mean([features[labels == k].var(axis=0).sum() for k in np.unique(labels)]))


def score(run, images: np.ndarray, labels: np.ndarray, net, cache: str) -> Dict[str, float]:
    quality = digits_quality(images, run.cfg, cache, labels=labels, verbose=False)
    features, _ = net(images, verbose=False)
    out = {k: float(quality[k]) for k in METRICS}
    out["floor_fid"] = float(quality["floor_fid"])  # real train vs test images, same count
    out["within_class_var"] = within_class_var(features, labels)
    return out


def setting(run, args, net, cache: str, name: str, sampler: str, steps: int,
            guidance: Optional[str], scale: float, classifier=None) -> Dict[str, object]:
    labels = cycle_labels(args.num, 10)
    began = time.time()
    images = sample_images(run, args.num, args.seed, sampler=sampler, steps=steps,
                           labels=labels, guidance=guidance, scale=scale, classifier=classifier)
    seconds = time.time() - began
    grid_dir = args.out + "_grids"
    save_image_grid(images[:100], os.path.join(grid_dir, f"{name}.png"), ncols=10, scale=2)
    row = {"name": name, "sampler": sampler, "steps": steps, "guidance": guidance or "none",
           "scale": scale, "sample_seconds": round(seconds, 1),
           **score(run, images, labels, net, cache)}
    print(json.dumps(row), flush=True)
    return row


def plan(args) -> List[Dict[str, object]]:
    """Every setting of the groups in ``--only`` (name, group, sampler, steps, guidance,
    scale), restricted to the names in ``--settings`` when given."""
    out = []
    if "cfg" in args.only:  # cfg0 = the null label (unconditional); cfg1 = conditional
        out += [dict(name=f"cfg{s:g}", group="cfg", sampler="ddim", steps=50, guidance="cfg",
                     scale=s) for s in args.cfg_scales]
    if "classifier" in args.only and args.classifier:
        out += [dict(name=f"classifier{s:g}_{sampler}", group="classifier", sampler=sampler,
                     steps=50, guidance="classifier", scale=s)
                for sampler in args.clf_sampler for s in [0.0] + list(args.clf_scales)]
    if "solvers" in args.only:  # conditional (scale 1); DDIM 50 is row "cfg1"
        out += [dict(name=f"{sampler}{steps}", group="solvers", sampler=sampler, steps=steps,
                     guidance=None, scale=1.0)
                for sampler, steps in (("dpm_solver", 20), ("ddim", 20))]
    if args.settings:
        wanted = [n.strip() for n in args.settings.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {s["name"] for s in out})
        if unknown:
            raise SystemExit(f"--settings: unknown {', '.join(unknown)}; with these --only/"
                             f"--*-scales/--clf-sampler the settings are "
                             f"{', '.join(s['name'] for s in out)}")
        out = [s for s in out if s["name"] in wanted]
    return out


def run_groups(run, args, net, cache: str) -> List[Dict[str, object]]:
    """The planned settings (:func:`plan`) plus the rows of ``<out>.json`` not re-run:
    with ``--settings`` every row of another name, else the other groups' rows; with
    ``--fresh`` none."""
    todo = plan(args)
    old = []
    if os.path.exists(args.out + ".json") and not args.fresh:
        names = {s["name"] for s in todo}
        with open(args.out + ".json") as f:
            old = [r for r in json.load(f)["rows"]
                   if r["name"] not in names
                   and (args.settings or r.get("group") not in args.only)]
    clf = None
    if any(s["guidance"] == "classifier" for s in todo):
        from ipu_diffusion.inference.classifier import load_classifier

        clf = load_classifier(args.classifier)
    rows = []
    for s in todo:
        rows.append(dict(setting(run, args, net, cache, s["name"], s["sampler"], s["steps"],
                                 s["guidance"], s["scale"],
                                 clf if s["guidance"] == "classifier" else None),
                         group=s["group"]))
    return old + rows


PANELS = (("label_agreement", "label agreement (digits CNN)"),
          ("within_class_var", "within-class feature variance\n(by requested label)"),
          ("recall", "recall (diversity)"), ("fid", "FID vs test split (digits CNN)"))


def plot(rows: List[Dict[str, object]], reference: Dict[str, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floors = [r["floor_fid"] for r in rows if "floor_fid" in r]
    reference = dict(reference, **({"fid": floors[0]} if floors else {}))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(16, 3.9))
    curves = [("cfg", "ddim", "o-"), ("classifier", "ddim", "s--"),
              ("classifier", "ddpm", "^-."), ("classifier", "dpm_solver", "d:")]
    for kind, sampler, style in curves:
        sel = sorted((r for r in rows if r.get("group") == kind and r["sampler"] == sampler),
                     key=lambda r: r["scale"])
        if not sel:
            continue
        xs = [r["scale"] for r in sel]
        for ax, (key, _) in zip(axes, PANELS):
            ax.plot(xs, [r[key] for r in sel], style,
                    label=f"{kind} guidance ({sampler} {sel[-1]['steps']})")
    for ax, (key, title) in zip(axes, PANELS):
        if key in reference:
            ax.axhline(reference[key], color="grey", lw=0.8, ls=":", label="real images")
        ax.set_xlabel("guidance scale")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="class-conditional digits run")
    p.add_argument("--classifier", default="", help="train-classifier directory (optional)")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0])
    p.add_argument("--clf-scales", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    p.add_argument("--clf-sampler", nargs="+", default=["ddim", "ddpm"],
                   choices=["ddpm", "ddim", "dpm_solver"],
                   help="samplers for classifier guidance, 50 steps each (ddpm: algorithm 1, "
                   "a mean shift by Sigma grad; ddim: algorithm 2, score form, with the "
                   "guided x0_hat clipped to [-1, 1]); rows are named classifier<scale>_<sampler>")
    p.add_argument("--only", nargs="+", default=["cfg", "classifier", "solvers"],
                   help="which groups to (re)run; rows of the others are kept from <out>.json")
    p.add_argument("--settings", default="",
                   help="comma-separated setting names to run (e.g. cfg1,classifier3_ddim,"
                   "dpm_solver20); default: every setting of the --only groups")
    p.add_argument("--fresh", action="store_true",
                   help="drop the rows of an existing <out>.json instead of keeping the others")
    p.add_argument("--out", default="benchmarks/results/guidance_curve")
    p.add_argument("--plot-only", action="store_true", help="redraw <out>.png from <out>.json")
    args = p.parse_args(argv)
    if args.plot_only:
        with open(args.out + ".json") as f:
            saved = json.load(f)
        plot(saved["rows"], saved["reference_real_test"], args.out + ".png")
        return 0
    run, step = _restore(args.workdir)
    cache = os.path.join(run.workdir, "eval_cache")
    net = load_digits_classifier(run.cfg, cache, verbose=False)
    from ipu_diffusion.data import load_arrays

    x_test, y_test = load_arrays(run.cfg, "test")
    feats, _ = net(x_test, verbose=False)
    reference = {"within_class_var": within_class_var(feats, y_test),
                 "label_agreement": float(net.record["test_accuracy"])}
    rows = run_groups(run, args, net, cache)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"workdir": args.workdir, "checkpoint_step": step, "num": args.num,
                   "reference_real_test": reference, "rows": rows}, f, indent=2)
    plot(rows, reference, args.out + ".png")
    print(f"wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
