"""Sampling throughput of the digits U-Net: DDPM (all 1000 steps) vs DDIM 100/50/20/10, and
the per-step overhead of the compiled sampling loop over a bare forward pass.

    .venv/bin/python benchmarks/sampling.py          # quick: batch 8, DDIM 50 and 10, 3 rounds
    FULL=1 .venv/bin/python benchmarks/sampling.py   # batch 64, DDIM 100/50/20/10, 5 rounds
    .venv/bin/python benchmarks/sampling.py precision   # only float32 vs bfloat16 (below)
    .venv/bin/python benchmarks/sampling.py guidance    # only the cost of classifier-free guidance
    .venv/bin/python benchmarks/sampling.py parts       # only one call vs eval.parallel_calls

Chains are ``diffusion.sampling.sample`` (one compiled ``tf.while_loop`` with the network
inside; DDIM respaces the 1000-step cosine diffusion uniformly) over
``inference.generate.denoise_fn_for(build_unet(digits))``; the bare forward pass is the
same ``denoise_fn`` under ``tf.function`` at the same batch. All are measured in
interleaved rounds; a short chain is called several times per sample so every sample
takes a comparable time. ``overhead`` = (chain seconds / steps) / forward seconds - 1.
The network is untrained (sampling cost does not depend on the weights) and, except for
``guidance``, unconditional (``benchlib.DIGITS_UNCONDITIONAL``).

``precision``: the same DDIM chain at ``eval.batch_size`` (250) with the network in float32
and in bfloat16 (``eval.precision`` / ``sample --precision bfloat16``), interleaved;
``bf16_speedup`` = float32 seconds / bfloat16 seconds per round. What bfloat16 does to
sample quality is measured on a trained run by ``digits_recipe.py --samplers ddim50_bf16``.
``parts``: the same DDIM chain at the eval batch with the network called once per step
and in ``eval.parallel_calls`` (at least 2) concurrent calls on parts of the batch;
``parts_speedup`` = one call's seconds / the parts' seconds per round.
``guidance``: what classifier-free guidance costs per step on the class-conditional digits
network (``digits_cond``): the same DDIM chain with plain conditional sampling and with CFG
as the package runs them (``eval.parallel_calls`` concurrent calls: with 2, CFG's
conditional and unconditional halves of the doubled batch are the two calls), and CFG as
one call over the doubled batch, interleaved, at batch 8 (latency-bound) and at
``eval.batch_size`` (compute-bound); ``cfg_cost`` = CFG seconds / conditional seconds per
round.
Writes ``results/sampling.json`` and ``results/sampling.png`` (``precision`` alone:
``results/sampling_precision.json``, quick DDIM-10 x 5 rounds or FULL DDIM-50 x 7;
``guidance`` / ``parts`` alone: ``results/sampling_guidance.json`` / ``sampling_parts.json``).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List

import benchlib as bl
import tensorflow as tf


def make_fns(cfg, batch: int, chains: Dict[str, tuple], policy: str = "float32",
             parts: int = 0):
    """``{name: zero-arg callable}`` for the forward pass and each ``(sampler, steps)``
    chain, the network built under the Keras dtype ``policy`` and called in ``parts``
    concurrent calls (0: ``eval.parallel_calls``, as the package samples)."""
    from ipu_diffusion._keras import keras
    from ipu_diffusion.diffusion import sampling
    from ipu_diffusion.models.unet import build_unet
    from ipu_diffusion.inference.generate import denoise_fn_for
    from ipu_diffusion.diffusion.gaussian import GaussianDiffusion

    keras.mixed_precision.set_global_policy(policy)
    try:
        unet = build_unet(cfg.model, zero_init=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    denoise = denoise_fn_for(unet, parts=parts or cfg.eval.parallel_calls)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    m = cfg.model
    shape = (batch, m.image_size, m.image_size, m.in_channels)
    x = tf.random.stateless_normal(shape, seed=[0, 1])
    t = tf.fill([batch], diffusion.num_timesteps // 2)
    forward = tf.function(denoise)
    fns = {"forward": lambda: forward(x, t)}
    for name, (sampler, steps) in chains.items():
        fns[name] = (lambda s=sampler, k=steps: sampling.sample(
            diffusion, denoise, shape, sampler=s, steps=k, seed=0))
    return fns


def measure(cfg, batch: int, ddim_steps, rounds: int, target_s: float = 1.0, log=None
            ) -> Dict[str, object]:
    T = cfg.diffusion.timesteps
    chains = {f"ddpm{T}": ("ddpm", T)}
    chains.update({f"ddim{k}": ("ddim", k) for k in ddim_steps})
    fns = make_fns(cfg, batch, chains)
    for fn in fns.values():  # trace once
        fn()
    forward_s = bl.seconds_per_call(fns["forward"], 5)
    plan = {"forward": (fns["forward"], max(1, int(round(target_s / forward_s))))}
    for name, (_, steps) in chains.items():  # several calls per sample for short chains
        plan[name] = (fns[name], max(1, int(round(target_s / (forward_s * steps)))))
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    cores: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name, (fn, calls) in plan.items():
            samples[name].append(bl.seconds_per_call(fn, calls, cores[name]))
        if log:
            log(f"  round {r + 1}/{rounds} load {os.getloadavg()[0]:.2f}")
    fwd = samples["forward"]
    base = f"ddpm{T}"
    rows: List[Dict[str, object]] = []
    for name, (sampler, steps) in chains.items():
        s = samples[name]
        rows.append({
            "name": name, "sampler": sampler, "steps": steps, "batch": batch,
            "seconds": bl.summary(s), "img_per_s": bl.summary([batch / v for v in s]),
            "step_s": bl.summary([v / steps for v in s]),
            "overhead_vs_forward": bl.summary([v / steps / f - 1.0 for v, f in zip(s, fwd)]),
            f"speedup_vs_{base}": bl.summary([b / v for v, b in zip(s, samples[base])]),
            "cores_used": bl.summary(cores[name]),
        })
        if log:
            log(f"  {name}: {rows[-1]['img_per_s']['median']:.2f} img/s, step overhead "
                f"{rows[-1]['overhead_vs_forward']['median']:+.1%}, x"
                f"{rows[-1][f'speedup_vs_{base}']['median']:.2f} vs {base}")
    return {"rows": rows, "forward_s": bl.summary(fwd), "batch": batch,
            "forward_cores_used": bl.summary(cores["forward"]),
            "calls_per_sample": {k: v[1] for k, v in plan.items()}}


def _eval_batch_rows(cfg, steps: int, rounds: int, variants: Dict[str, tuple], log=None):
    """DDIM-``steps`` at the eval batch for each ``{name: (policy, parts)}``, interleaved:
    ``(out, seconds)``."""
    batch = cfg.eval.batch_size
    name = f"ddim{steps}"
    fns = {k: make_fns(cfg, batch, {name: ("ddim", steps)}, policy, parts)[name]
           for k, (policy, parts) in variants.items()}
    secs = bl.interleaved(fns, rounds, log=log)
    return {"batch": batch, "chain": name,
            "img_per_s": {k: bl.summary([batch / v for v in s]) for k, s in secs.items()}}, secs


def precision_rows(cfg, steps: int, rounds: int, log=None) -> Dict[str, object]:
    """DDIM-``steps`` at the eval batch, network in float32 vs bfloat16, interleaved."""
    out, secs = _eval_batch_rows(cfg, steps, rounds, {"float32": ("float32", 0),
                                                      "bfloat16": ("mixed_bfloat16", 0)}, log)
    out["bf16_speedup"] = bl.summary([a / b for a, b in zip(secs["float32"], secs["bfloat16"])])
    if log:
        log(f"  {out['chain']} at batch {out['batch']}: bfloat16 x"
            f"{out['bf16_speedup']['median']:.2f} float32's rate "
            f"(spread {out['bf16_speedup']['spread']:.0%})")
    return out


def parts_rows(cfg, steps: int, rounds: int, log=None) -> Dict[str, object]:
    """DDIM-``steps`` at the eval batch, the network called once per step vs in
    ``eval.parallel_calls`` concurrent parts, interleaved."""
    parts = max(cfg.eval.parallel_calls, 2)
    out, secs = _eval_batch_rows(cfg, steps, rounds, {"one_call": ("float32", 1),
                                                      f"{parts}_parts": ("float32", parts)}, log)
    out["parts"] = parts
    out["parts_speedup"] = bl.summary([a / b for a, b in zip(secs["one_call"],
                                                              secs[f"{parts}_parts"])])
    if log:
        log(f"  {out['chain']} at batch {out['batch']}: {parts} concurrent calls x"
            f"{out['parts_speedup']['median']:.2f} one call's rate")
    return out


def guidance_rows(cfg, steps: int, batches, rounds: int, log=None) -> Dict[str, object]:
    """Per batch size: seconds of DDIM chains of the untrained class-conditional network
    of ``cfg``, interleaved: conditional sampling and CFG as the package runs them
    (``eval.parallel_calls`` concurrent calls; with 2, CFG's conditional and unconditional
    halves are the two calls), and CFG as one call over the doubled batch."""
    from ipu_diffusion.diffusion import guidance, sampling
    from ipu_diffusion.diffusion.gaussian import GaussianDiffusion
    from ipu_diffusion.inference.generate import conditional_fn_for
    from ipu_diffusion.models.unet import build_unet

    m = cfg.model
    unet = build_unet(m, zero_init=False)
    model_fn = conditional_fn_for(unet, cfg.eval.parallel_calls)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)

    out: Dict[str, object] = {"chain": f"ddim{steps}", "parts": cfg.eval.parallel_calls,
                              "rows": []}
    for batch in batches:
        shape = (batch, m.image_size, m.image_size, m.in_channels)
        guides = {"conditional": guidance.conditional_guide(model_fn),
                  "cfg": guidance.cfg_guide(model_fn, m.num_classes),
                  "cfg_one_call": guidance.cfg_guide(conditional_fn_for(unet, 1), m.num_classes)}
        fns = {}
        for name, guide in guides.items():
            guide.set(guidance.cycle_labels(batch, m.num_classes), scale=3.0)
            fns[name] = (lambda g=guide: sampling.sample(
                diffusion, g.denoise_fn, shape, sampler="ddim", steps=steps, seed=0))
        secs = bl.interleaved(fns, rounds, log=log)
        row = {"batch": batch, "step_s": {k: bl.summary([v / steps for v in s])
                                          for k, s in secs.items()}}
        for name in ("cfg", "cfg_one_call"):
            row[f"{name}_cost"] = bl.summary([a / b for a, b in zip(secs[name],
                                                                   secs["conditional"])])
        out["rows"].append(row)
        if log:
            log(f"  batch {batch}: CFG x{row['cfg_cost']['median']:.2f} a conditional step "
                f"(one call over the doubled batch x{row['cfg_one_call_cost']['median']:.2f})")
    return out


def _digits():
    """The digits config these benchmarks measure (guidance aside): the unconditional network."""
    return bl.load("digits", bl.DIGITS_UNCONDITIONAL)


def main() -> Dict[str, object]:
    def rows(full):
        cfg, batch = _digits(), 64 if full else 8
        bl.log(f"sampling: digits, batch {batch}, load {os.getloadavg()[0]:.2f}")
        res = measure(cfg, batch, (100, 50, 20, 10) if full else (50, 10),
                      rounds=5 if full else 3, target_s=2.0 if full else 0.5, log=bl.log)
        res["precision"] = precision_rows(cfg, 50 if full else 10, rounds=5 if full else 3,
                                          log=bl.log)
        res["parallel_calls"] = parts_rows(cfg, 50 if full else 10, rounds=5 if full else 3,
                                           log=bl.log)
        cond = bl.load("digits_cond")
        res["guidance"] = guidance_rows(cond, 10, (8, cond.eval.batch_size),
                                        rounds=5 if full else 3, log=bl.log)
        return res

    payload = _write("sampling", rows)
    table = payload["rows"]
    bl.bar_chart(bl.chart_path("sampling"), [r["name"] for r in table],
                 [r["img_per_s"]["median"] for r in table], [r["img_per_s"]["min"] for r in table],
                 [r["img_per_s"]["max"] for r in table], ylabel="images / s",
                 title=f"digits sampling, batch {payload['batch']} (compiled chains)")
    return payload


def _write(name: str, rows: Callable[[bool], Dict[str, object]]) -> Dict[str, object]:
    """``rows(FULL=1?)`` with the machine state before and after, into ``results/<name>.json``."""
    env = bl.environment()
    res = rows(bl.full_mode())
    env["loadavg_end"] = list(os.getloadavg())
    payload = {"benchmark": name, "environment": env, **res}
    bl.write_json(name, payload)
    return payload


def main_precision() -> Dict[str, object]:
    return _write("sampling_precision", lambda full: precision_rows(
        _digits(), 50 if full else 10, rounds=7 if full else 5, log=bl.log))


def main_guidance() -> Dict[str, object]:
    def rows(full):
        cond = bl.load("digits_cond")
        return guidance_rows(cond, 50 if full else 10, (8, cond.eval.batch_size),
                             rounds=7 if full else 5, log=bl.log)

    return _write("sampling_guidance", rows)


def main_parts() -> Dict[str, object]:
    return _write("sampling_parts", lambda full: parts_rows(
        _digits(), 50 if full else 10, rounds=7 if full else 5, log=bl.log))


if __name__ == "__main__":
    import sys

    modes = {"": main, "precision": main_precision, "guidance": main_guidance,
             "parts": main_parts}
    mode = " ".join(sys.argv[1:])
    if mode not in modes:
        sys.exit(f"usage: sampling.py [precision | guidance | parts], not {mode!r}")
    modes[mode]()
