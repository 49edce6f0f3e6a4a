"""Which digits recipe gives the best samples in ``make train``'s wall budget: each recipe
is trained for the same number of seconds on the same machine and scored like
``make train`` (1,000 DDIM-50 samples of the EMA against the 360 held-out digits, the
digits classifier's FID/IS/precision/recall and the near-copy check).

    .venv/bin/python benchmarks/digits_recipe.py                          # every recipe, seed 0
    .venv/bin/python benchmarks/digits_recipe.py --recipes default,minsnr5 --seeds 0,1,2
    .venv/bin/python benchmarks/digits_recipe.py --report                 # table + chart only

A recipe is a list of ``--set`` overrides of ``pipeline_configs/digits.yaml``. The budget
is the wall time of ``--budget-steps`` steps (3,000: ``make train``'s) of the reference
recipe, the unconditional network (the default until 2026-12-04; the conditional default
runs at 0.990x its rate, so 2,970 steps). Each recipe gets the steps that fit in that time
at its own rate relative to the reference's, measured first on this machine
(``benchlib.TrainStep``, interleaved rounds of every recipe and the reference in one
process; a recipe whose network and batch are the reference's, e.g. a loss weighting or
the EMA, costs what the reference costs and is not measured; a rate is measured once, so
every seed of a recipe gets the same steps, ``--recalibrate`` measures it again): a faster
step buys more steps, and the cosine learning-rate decay ends at the budget. A ratio, not
seconds, because this shared machine's speed drifts (seen: 2x within a day); what a run learns
depends on its steps, not on how long they took.

Each run is the real command, ``python -m ipu_diffusion train``, timed whole as ``make
train`` would be (start-up, training, sample grid, the end-of-run evaluation; the fp32
matmul rate measured right after says how fast the machine was running). Its checkpoints
at 1/3 and 2/3 of the steps are then scored the same way in another process: the chart's
curves (FID and precision against training time, one line per recipe; the time in reference
steps, since measured seconds depend on the machine's load).

Writes ``results/digits_recipe.json`` (runs accumulate across invocations, keyed by recipe,
seed and budget; a rerun replaces its key) and ``results/digits_recipe_<budget>.png``; the run
directories go to ``runs/digits_recipe/`` (not committed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

RUNS = os.path.join(ROOT, "runs", "digits_recipe")
NAME = "digits_recipe"
BUDGET_STEPS = 3000  # the reference recipe's steps (make train's)
POINTS = 3  # scored checkpoints per run (--points): at 1/3, 2/3 and the end

# the unconditional network, the default until 2026-12-04: every recipe after "uncond"
# below was measured on that base and keeps it
from machine import DIGITS_UNCONDITIONAL as UNCOND  # noqa: E402

#: recipe -> overrides of pipeline_configs/digits.yaml
RECIPES: Dict[str, List[str]] = {
    # make train's: class-conditional on the labels (sampled with labels 0..9 cycled, as
    # the held-out digits are near-uniform over them; 10% of the training labels dropped
    # to the null label, so the CFG variants work too); its runs before it became the
    # default (2026-12-04) were recorded as the recipe "cond"
    "default": [],
    "uncond": UNCOND,  # the default until 2026-12-04, recorded as "default" then
    # attention heads of 8 channels, as diffusers' UNet2DModel (attention_head_dim 8)
    "heads8": ["model.num_heads=8"],
    **{name: UNCOND + sets for name, sets in {
        "minsnr5": ["diffusion.min_snr_gamma=5"],
        "vpred": ["diffusion.mean_type=v"],
        "ema999": ["training.ema_decay=0.999"],
        "ema999_minsnr5": ["training.ema_decay=0.999", "diffusion.min_snr_gamma=5"],
        "dropout0": ["model.dropout=0"],
        "noattn": ["model.attn_resolutions=[]"],
        "ch48": ["model.ch=48"],
        "batch128": ["training.batch_size=128"],
        "lr1e-3": ["training.lr=1e-3"],
    }.items()},
}
#: the recipe whose step rate the budget and the others' rates are measured against
REFERENCE = "uncond"
#: sampler variants scored on the final checkpoint of each run besides eval's DDIM-50
#: (sampler, steps, eta, network precision[, classifier-free guidance scale])
SAMPLERS = {"ddim100": ("ddim", 100, 0.0, "float32"), "ddim50_eta0": ("ddim", 50, 0.0, "float32"),
            "ddim50_eta0.25": ("ddim", 50, 0.25, "float32"),
            "ddim50_eta0.5": ("ddim", 50, 0.5, "float32"), "ddim50_eta0.75": ("ddim", 50, 0.75, "float32"),
            "ddim50_eta1": ("ddim", 50, 1.0, "float32"), "ddim100_eta0.5": ("ddim", 100, 0.5, "float32"),
            "ddpm250": ("ddpm", 250, 0.0, "float32"), "ddim50_bf16": ("ddim", 50, 0.0, "bfloat16"),
            **{f"cfg{w:g}_eta0.5": ("ddim", 50, 0.5, "float32", w) for w in (0.75, 1.25, 1.5, 2.0)}}
SCORES = ("fid", "inception_score", "precision", "recall", "near_copies")


def _config(recipe: str, extra: Sequence[str] = ()):
    import benchlib as bl

    return bl.load("digits", RECIPES[recipe] + list(extra))


def calibrate(recipes: Sequence[str], rounds: int = 3, calls: int = 20) -> Dict[str, dict]:
    """Training images per second of each recipe's compiled step (and the reference's),
    interleaved rounds; ``relative``: each round's rate over the reference's in that round."""
    import benchlib as bl

    same = [r for r in recipes if r != REFERENCE and not _changes_compute(r)]
    recipes = [REFERENCE] + [r for r in recipes if r != REFERENCE and r not in same]
    if len(recipes) == 1:
        recipes = []
    steps = {r: bl.TrainStep(_config(r)) for r in recipes}
    for step in steps.values():
        step()  # trace
    secs = bl.interleaved(steps, rounds, calls=calls, log=bl.log) if steps else {}
    img_s = {r: [steps[r].cfg.training.batch_size / s for s in secs[r]] for r in recipes}
    out = {r: dict(bl.summary(v), relative=bl.summary(
        [a / d for a, d in zip(v, img_s[REFERENCE])])) for r, v in img_s.items()}
    for r in same:
        out[r] = {"relative": {"median": 1.0}, "note": "same network and batch as the "
                  "reference: the same step cost by construction, not measured"}
    out.setdefault(REFERENCE, {"relative": {"median": 1.0}, "note": "the reference"})
    return out


def _changes_compute(recipe: str) -> bool:
    """Whether the recipe's training step computes something else than the reference's:
    another network (other than its dropout rate) or batch. Objective, EMA and
    learning-rate recipes do not."""
    from ipu_diffusion.config import to_dict

    def compute(name):
        cfg = to_dict(_config(name))
        return dict(cfg["model"], dropout=None), cfg["training"]["batch_size"]

    return compute(recipe) != compute(REFERENCE)


def _steps_for(recipe: str, relative: float, budget_steps: int, points: int) -> int:
    """Steps of ``recipe`` in the reference's ``budget_steps`` steps' time (a multiple of
    ``points``: a checkpoint at each 1/points)."""
    reference_batch = _config(REFERENCE).training.batch_size
    batch = _config(recipe).training.batch_size
    steps = budget_steps * relative * reference_batch / batch
    return max(points, int(round(steps / points)) * points)


def matmul_gflops() -> float:
    """This machine's fp32 2048^2 matmul rate now (median of 5): how fast it is running,
    recorded beside each run's wall times (its speed drifts with the neighbours' load)."""
    import benchlib as bl
    import roofline

    fn = roofline.matmul_fn(2048, roofline.DTYPES["fp32"])
    fn()
    secs = sorted(bl.seconds_per_call(fn, 3) for _ in range(5))
    return round(2.0 * 2048 ** 3 / secs[2] / 1e9, 1)


def train_run(recipe: str, seed: int, steps: int, points: int, workdir: str) -> Dict[str, object]:
    """``python -m ipu_diffusion train`` of the recipe, timed whole; its metrics.json."""
    sets = RECIPES[recipe] + [f"run.seed={seed}", f"training.steps={steps}",
                              f"training.checkpoint_every={steps // points}",
                              f"training.keep_checkpoints={points + 1}",
                              f"training.log_every={max(1, steps // 30)}"]
    cmd = [sys.executable, "-m", "ipu_diffusion", "train", "--config", "digits",
           "--workdir", workdir] + [f"--set={s}" for s in sets]
    began = time.time()
    with open(workdir + ".log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.time() - began
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    return {"overrides": sets, "command_wall_s": round(wall, 1), "metrics": metrics}


def score_checkpoints(workdir: str, steps: Sequence[int], samplers: Sequence[str]) -> dict:
    """In this process: each checkpoint of ``steps`` with eval's sampler, and the newest
    one with each of ``samplers``; the scores of ``evaluation.run_eval``."""
    from ipu_diffusion.evaluation.run_eval import _quality
    from ipu_diffusion.inference import Pipeline
    from ipu_diffusion.inference.generate import sample_images

    def score(pipe, sampler, n, eta, precision="float32", cfg_scale=None):
        if precision != pipe.cfg.eval.precision:
            pipe = Pipeline.from_workdir(workdir, [f"eval.precision={precision}"], step=pipe.step)
        began = time.time()
        guide = {} if cfg_scale is None else {"guidance": "cfg", "scale": cfg_scale}
        images = sample_images(pipe, pipe.cfg.eval.num_samples, pipe.cfg.run.seed,
                               sampler=sampler, steps=n, eta=eta, progress=False, **guide)
        q = _quality(pipe, images, verbose=False)
        return dict({k: q[k] for k in SCORES}, seconds=round(time.time() - began, 1))

    out: Dict[str, object] = {"points": {}, "samplers": {}}
    for step in steps:
        pipe = Pipeline.from_workdir(workdir, step=step)
        e = pipe.cfg.eval
        out["points"][str(step)] = score(pipe, e.sampler, e.steps, e.eta)
    if samplers:
        pipe = Pipeline.from_workdir(workdir)
        out["samplers_step"] = pipe.step
    for name in samplers:
        out["samplers"][name] = score(pipe, *SAMPLERS[name])
    return out


def _child_score(workdir: str, steps: Sequence[int], samplers: Sequence[str]) -> dict:
    """score_checkpoints in a fresh process (the training run's memory is gone)."""
    code = ("import json, sys; sys.path.insert(0, %r); import digits_recipe as d; "
            "print(json.dumps(d.score_checkpoints(%r, %r, %r)))" % (HERE, workdir, list(steps),
                                                                    list(samplers)))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _save(payload: dict, budget: int, keys: Sequence[str] = ()) -> str:
    """Write the results, first merging in what another invocation wrote meanwhile: only
    the runs ``keys`` (and the calibration) come from ``payload``."""
    import benchlib as bl

    on_disk = bl.read_json(NAME)
    if on_disk:
        runs = dict(on_disk["runs"], **{k: payload["runs"][k] for k in keys})
        payload = dict(on_disk, runs=runs, recipes=dict(on_disk["recipes"], **payload["recipes"]),
                       calibration=dict(on_disk["calibration"], **payload["calibration"]))
    payload["summary"] = summarise(payload["runs"], budget)
    return bl.write_json(NAME, payload)


def _key(recipe: str, seed: int, budget: int) -> str:
    return f"{recipe}/seed{seed}/{budget}"


def _own_sampler(run: dict) -> str:
    """The name of the sampler eval used in ``run`` (as in ``SAMPLERS`` when it is one of
    them; the default's eval eta changed between runs: 0, 0.5, 0.25)."""
    e = run["metrics"]["eval"]
    own = (e["sampler"], e["steps"], e["eta"], e.get("sampling_precision", "float32"))
    return next((k for k, v in SAMPLERS.items() if v == own),
                f"{e['sampler']}{e['steps']}_eta{e['eta']:g}")


def _variants(run: dict) -> Dict[str, dict]:
    """The final checkpoint's scores by sampler: eval's own and each ``--samplers`` variant
    scored afterwards."""
    return dict(run["scores"]["samplers"], **{_own_sampler(run): run["metrics"]["eval"]})


def summarise(runs: Dict[str, dict], budget: int) -> Dict[str, dict]:
    """Per recipe and sampler at ``budget``: mean, min and max of the final checkpoint's
    scores over the seeds that have that sampler scored, and of each seed's FID over its
    own real-data floor (``fid_over_floor``: the held-out split depends on the seed)."""
    import numpy as np

    by_recipe: Dict[str, List[dict]] = {}
    for run in runs.values():
        if run["budget_steps"] == budget:
            by_recipe.setdefault(run["recipe"], []).append(run)
    table = {}
    for recipe, rs in sorted(by_recipe.items()):
        row = {"seeds": sorted(r["seed"] for r in rs), "steps": rs[0]["steps"],
               "command_wall_s": [r["command_wall_s"] for r in rs],
               "img_per_s": [r["metrics"]["img_per_s"] for r in rs], "samplers": {}}
        scored = [(r["seed"], {name: dict(v, fid_over_floor=v["fid"] / floor)
                               for name, v in _variants(r).items()})
                  for r in rs for floor in [r["metrics"]["eval"]["floor_fid"]]]
        for name in sorted({n for _, v in scored for n in v}):
            got = sorted((seed, v[name]) for seed, v in scored if name in v)
            stats = row["samplers"][name] = {"seeds": [seed for seed, _ in got]}
            for k in SCORES + ("fid_over_floor",):
                vals = [v[k] for _, v in got]
                stats[k] = {"mean": float(np.mean(vals)), "min": float(min(vals)),
                            "max": float(max(vals))}
        table[recipe] = row
    return table


def markdown(payload: dict, budget: int) -> str:
    """The runs at ``budget`` as tables: each seed's final checkpoint (each sampler a row),
    then the mean [min, max] over seeds per recipe and sampler."""
    head = ("| recipe (seed) | steps | sampler | FID | IS | precision / recall | near copies |\n"
            "| --- | --- | --- | --- | --- | --- | --- |")
    rows, floor = [head], None
    for key, run in sorted(payload["runs"].items()):
        if run["budget_steps"] != budget:
            continue
        floor = run["metrics"]["eval"]
        for name, v in sorted(_variants(run).items()):
            rows.append(f"| {run['recipe']} ({run['seed']}) | {run['steps']:,} | {name} | "
                        f"{v['fid']:.3f} | {v['inception_score']:.2f} | {v['precision']:.3f} / "
                        f"{v['recall']:.3f} | {100 * v['near_copies']:.1f}% |")
    if floor:
        rows.append(f"| real train vs test (floor) | | | {floor['floor_fid']:.3f} | "
                    f"{floor['floor_inception_score']:.2f} | {floor['floor_precision']:.3f} / "
                    f"{floor['floor_recall']:.3f} | |")
    rows += ["", "| recipe | sampler | seeds | FID | FID / floor | IS | precision | recall "
             "| near copies |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    cell = "{mean:.3f} [{min:.3f}, {max:.3f}]".format
    for recipe, row in sorted(summarise(payload["runs"], budget).items()):
        for name, v in row["samplers"].items():
            rows.append(f"| {recipe} | {name} | {','.join(map(str, v['seeds']))} | "
                        + " | ".join(cell(**v[k]) for k in ("fid", "fid_over_floor")
                                     + SCORES[1:4])
                        + f" | {100 * v['near_copies']['mean']:.1f}% |")
    return "\n".join(rows)


def chart(payload: dict, budget: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import benchlib as bl

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    floor, labelled = None, set()
    samplers = sorted({_own_sampler(r) for r in payload["runs"].values()})
    for recipe in sorted({r["recipe"] for r in payload["runs"].values()}):
        rs = [r for r in payload["runs"].values() if r["recipe"] == recipe and r["budget_steps"] == budget]
        for run in sorted(rs, key=lambda r: r["seed"]):
            pts = sorted((int(s), p) for s, p in run["scores"]["points"].items())
            # the time of the reference's steps: every run ends at the budget by construction
            secs = [s / run["steps"] * budget for s, _ in pts]
            # the checkpoints are scored with the run's eval sampler: one line style each
            own = _own_sampler(run)
            label = f"{recipe}, {own}"
            for ax, key in zip(axes, ("fid", "precision")):
                ax.plot(secs, [p[key] for _, p in pts], marker="o", lw=1.2,
                        color=plt.get_cmap("tab20")(sorted(RECIPES).index(recipe) % 20),
                        ls=("-", "--", ":", "-.")[samplers.index(own) % 4],
                        label=None if label in labelled else label, alpha=0.8)
            labelled.add(label)
            floor = run["metrics"]["eval"]
    for ax, key, title in zip(axes, ("fid", "precision"), ("FID (lower is better)",
                                                          "precision (higher is better)")):
        if floor:
            ax.axhline(floor["floor_" + key], color="k", ls="--", lw=1, label="real-data floor")
        ax.set_xlabel("training time, in steps of the unconditional network (make train: 3,000)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"digits recipes in the time of {budget:,} reference steps "
                 "(1,000 DDIM-50 samples per point)")
    fig.tight_layout()
    path = bl.chart_path(f"{NAME}_{budget}")
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    import benchlib as bl

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, from: "
                   + ", ".join(RECIPES))
    p.add_argument("--seeds", default="0")
    p.add_argument("--budget-steps", type=int, default=BUDGET_STEPS,
                   help="the budget: the time of this many steps of the reference recipe")
    p.add_argument("--samplers", default="", help="also score the final checkpoint with: "
                   + ", ".join(SAMPLERS))
    p.add_argument("--points", type=int, default=POINTS, help="scored checkpoints per run")
    p.add_argument("--recalibrate", action="store_true", help="measure the step rates of "
                   "--recipes again (default: only those without a recorded rate)")
    p.add_argument("--report", action="store_true", help="only rewrite the summary and chart")
    p.add_argument("--rescore", action="store_true", help="no training: score --samplers on "
                   "the final checkpoints of the recorded runs of --recipes and --seeds")
    a = p.parse_args(argv)
    recipes = [r for r in a.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    samplers = [s for s in a.samplers.split(",") if s]
    unknown += [s for s in samplers if s not in SAMPLERS]
    if unknown:
        p.error(f"unknown recipe/sampler {unknown}; valid: {list(RECIPES)} / {list(SAMPLERS)}")
    payload = bl.read_json(NAME) or {"benchmark": NAME, "recipes": {}, "calibration": {},
                                     "runs": {}}
    if a.rescore:
        for seed in [int(s) for s in a.seeds.split(",")]:
            for recipe in recipes:
                run = payload["runs"][_key(recipe, seed, a.budget_steps)]
                scores = _child_score(os.path.join(ROOT, run["workdir"]), [], samplers)
                run["scores"]["samplers"].update(scores["samplers"])
                run["scores"]["samplers_step"] = scores["samplers_step"]
                bl.log(f"{recipe} seed {seed} at step {scores['samplers_step']}: "
                       + ", ".join(f"{k} FID {v['fid']:.3f} precision {v['precision']:.3f}"
                                   for k, v in scores["samplers"].items()))
                _save(payload, a.budget_steps, [_key(recipe, seed, a.budget_steps)])
    elif not a.report:
        # seeds of a recipe get the same steps: its recorded rate unless --recalibrate
        todo = recipes if a.recalibrate else [r for r in recipes if r not in payload["calibration"]]
        if todo:
            payload["calibration"].update(calibrate(todo))
            payload["calibration_environment"] = bl.environment()
        os.makedirs(RUNS, exist_ok=True)
        for seed in [int(s) for s in a.seeds.split(",")]:
            for recipe in recipes:
                rel = payload["calibration"][recipe]["relative"]["median"]
                steps = _steps_for(recipe, rel, a.budget_steps, a.points)
                workdir = os.path.join(RUNS, f"{recipe}_s{seed}_{a.budget_steps}")
                bl.log(f"{recipe} seed {seed}: {steps} steps ({rel:.3f}x the reference's rate)")
                run = train_run(recipe, seed, steps, a.points, workdir)
                run.update(recipe=recipe, seed=seed, budget_steps=a.budget_steps, steps=steps,
                           environment=bl.environment(), matmul_gflops_after=matmul_gflops(),
                           workdir=os.path.relpath(workdir, ROOT))
                run["scores"] = _child_score(workdir, [steps // a.points * i for i in
                                                       range(1, a.points)], samplers)
                e = run["metrics"]["eval"]
                run["scores"]["points"][str(steps)] = dict(
                    {k: e[k] for k in SCORES}, seconds=e["wall_time_s"])
                payload["recipes"][recipe] = RECIPES[recipe]
                payload["runs"][_key(recipe, seed, a.budget_steps)] = run
                bl.log(f"  {run['command_wall_s']:.0f} s in all: FID {e['fid']:.3f} "
                       f"(floor {e['floor_fid']:.3f}), IS {e['inception_score']:.2f}, "
                       f"precision {e['precision']:.3f}, recall {e['recall']:.3f}, "
                       f"near copies {e['near_copies']:.1%}")
                # after every run: nothing lost on a crash
                _save(payload, a.budget_steps, [_key(recipe, seed, a.budget_steps)])
    path = _save(payload, a.budget_steps)
    final = bl.read_json(NAME)
    bl.log(markdown(final, a.budget_steps))
    bl.log(f"wrote {path} and {chart(final, a.budget_steps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
