"""The U-Net's block plan: names, carry keys, resolutions and channels, from a ModelConfig.

Pure Python (no Keras), so the pipeline partitioner and tests can reason about a network
without building it. The layout is the DDPM U-Net (Ho et al. 2020, appendix B) with the
improved-DDPM options (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021):

    embed                       t [, y]              -> emb    [4ch]
    in_conv                     x_t                  -> skip_0 [R, R, ch]
    down{l}_res{i}              skip_{k-1}, emb, key -> skip_k  (+ attention at attn_resolutions)
    down{l}_down   (l < L-1)    skip_{k-1} [, emb, key] -> skip_k  (R -> R/2)
    mid_res0                    skip_n, emb, key     -> h
    mid_attn                    h                    -> h
    mid_res1                    h, emb, key          -> h
    up{l}_res{i}   (i <= nres)  h, skip_j, emb, key  -> h       (skips consumed last-in first-out)
    up{l}_up       (l > 0)      h [, emb, key]       -> h       (R -> 2R)
    out                         h                    -> out    [R, R, out_channels] float32

Every activation of the down path is a skip, so down blocks write ``skip_k`` and the next
block reads it as its input: no tensor is carried twice under two names. Residual blocks
read ``key`` (per-example dropout keys) even with dropout 0, so the interface of a block
does not depend on hyperparameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ipu_diffusion.config import ConfigError, ModelConfig
from ipu_diffusion.models.carry import BlockSpec


@dataclass(frozen=True)
class BlockPlan:
    """One block: its carry interface and the sizes needed to build and cost it.

    ``kind`` is one of embed, in_conv, res, attn, down, up, out. ``resolution`` is the
    spatial size of the block's input; ``in_channels`` of its main input, ``skip_channels``
    of the skip it concatenates (up path) or 0; ``out_resolution``/``out_channels`` of
    what it writes. ``attention``: a self-attention layer follows the residual block.
    """

    spec: BlockSpec
    kind: str
    resolution: int = 0
    in_channels: int = 0
    skip_channels: int = 0
    out_channels: int = 0
    out_resolution: int = 0
    attention: bool = False


def resolutions(cfg: ModelConfig) -> List[int]:
    """Spatial sizes of the levels: ``[R, R/2, ..., R/2^(L-1)]``."""
    return [cfg.image_size // 2 ** level for level in range(len(cfg.ch_mult))]


def out_channels(cfg: ModelConfig) -> int:
    """``2 * in_channels`` with a learned variance (Nichol & Dhariwal 2021), else ``in_channels``."""
    return cfg.in_channels * (2 if cfg.learn_sigma else 1)


def num_heads_for(cfg: ModelConfig, channels: int) -> int:
    """Attention heads for ``channels``: ``channels // num_head_channels`` if that is > 0."""
    if cfg.num_head_channels > 0:
        return channels // cfg.num_head_channels
    return cfg.num_heads


def _res_inputs(h: str, skip: Optional[str] = None) -> Tuple[str, ...]:
    return (h,) + ((skip,) if skip else ()) + ("emb", "key")


def _down_path(cfg: ModelConfig, plans: List[BlockPlan]) -> List[Tuple[str, int]]:
    """Append in_conv and the down blocks; return the skips ``[(key, channels)]`` in order."""
    res = cfg.image_size
    plans.append(BlockPlan(BlockSpec("in_conv", ("x_t",), ("skip_0",)), "in_conv", res,
                           cfg.in_channels, 0, cfg.ch, res))
    skips = [("skip_0", cfg.ch)]
    for level, mult in enumerate(cfg.ch_mult):
        for i in range(cfg.num_res_blocks):
            prev, ch = skips[-1]
            key = f"skip_{len(skips)}"
            plans.append(BlockPlan(BlockSpec(f"down{level}_res{i}", _res_inputs(prev), (key,)),
                                   "res", res, ch, 0, cfg.ch * mult, res, res in cfg.attn_resolutions))
            skips.append((key, cfg.ch * mult))
        if level != len(cfg.ch_mult) - 1:
            prev, ch = skips[-1]
            key = f"skip_{len(skips)}"
            inputs = _res_inputs(prev) if cfg.resblock_updown else (prev,)
            plans.append(BlockPlan(BlockSpec(f"down{level}_down", inputs, (key,)),
                                   "down", res, ch, 0, ch, res // 2))
            skips.append((key, ch))
            res //= 2
    return skips


def _up_path(cfg: ModelConfig, plans: List[BlockPlan], skips: List[Tuple[str, int]]) -> None:
    res = resolutions(cfg)[-1]
    ch = skips[-1][1]
    for level in reversed(range(len(cfg.ch_mult))):
        for i in range(cfg.num_res_blocks + 1):
            skip, skip_ch = skips.pop()
            out_ch = cfg.ch * cfg.ch_mult[level]
            plans.append(BlockPlan(BlockSpec(f"up{level}_res{i}", _res_inputs("h", skip), ("h",)),
                                   "res", res, ch, skip_ch, out_ch, res, res in cfg.attn_resolutions))
            ch = out_ch
        if level != 0:
            inputs = _res_inputs("h") if cfg.resblock_updown else ("h",)
            plans.append(BlockPlan(BlockSpec(f"up{level}_up", inputs, ("h",)),
                                   "up", res, ch, 0, ch, res * 2))
            res *= 2


def plan_unet(cfg: ModelConfig) -> List[BlockPlan]:
    """The ordered block plan of the U-Net for ``cfg``; raises ConfigError if it cannot fit."""
    validate_model(cfg)
    embed_in = ("t", "y") if cfg.num_classes > 0 else ("t",)
    plans = [BlockPlan(BlockSpec("embed", embed_in, ("emb",)), "embed", 0, cfg.ch, 0, 4 * cfg.ch)]
    skips = _down_path(cfg, plans)
    res = resolutions(cfg)[-1]
    prev, ch = skips[-1]
    plans += [
        BlockPlan(BlockSpec("mid_res0", _res_inputs(prev), ("h",)), "res", res, ch, 0, ch, res),
        BlockPlan(BlockSpec("mid_attn", ("h",), ("h",)), "attn", res, ch, 0, ch, res),
        BlockPlan(BlockSpec("mid_res1", _res_inputs("h"), ("h",)), "res", res, ch, 0, ch, res),
    ]
    _up_path(cfg, plans, skips)
    plans.append(BlockPlan(BlockSpec("out", ("h",), ("out",)), "out", cfg.image_size, cfg.ch, 0,
                           out_channels(cfg), cfg.image_size))
    _check_channels(cfg, plans)
    return plans


def validate_model(cfg: ModelConfig) -> None:
    """Checks of the U-Net geometry; each raises a ConfigError naming key and value."""
    levels = len(cfg.ch_mult)
    if levels == 0 or cfg.image_size % 2 ** (levels - 1):
        raise ConfigError(
            f"model.ch_mult: {list(cfg.ch_mult)} has {levels} levels, which halve the image "
            f"{levels - 1} times, but model.image_size {cfg.image_size} is not divisible by "
            f"2**{levels - 1} = {2 ** max(levels - 1, 0)}")
    present = resolutions(cfg)
    for r in cfg.attn_resolutions:
        if r not in present:
            raise ConfigError(
                f"model.attn_resolutions: {r} never occurs; the resolutions of this U-Net are "
                + ", ".join(str(p) for p in present))
    if cfg.num_head_channels <= 0 and cfg.num_heads <= 0:
        raise ConfigError(f"model.num_heads: {cfg.num_heads} must be > 0 "
                          "(or set model.num_head_channels > 0)")


def _check_channels(cfg: ModelConfig, plans: List[BlockPlan]) -> None:
    """GroupNorm and attention-head divisibility for every normalised channel count."""
    for p in plans:
        if p.kind in ("embed", "in_conv"):
            continue
        normed = {p.in_channels + p.skip_channels, p.out_channels} if p.kind != "out" else {p.in_channels}
        for c in sorted(normed):
            if c % cfg.num_groups:
                raise ConfigError(f"model.num_groups: {cfg.num_groups} does not divide the "
                                  f"{c} channels of block {p.spec.name}")
        if p.attention or p.kind == "attn":
            c = p.out_channels
            if cfg.num_head_channels > 0 and c % cfg.num_head_channels:
                raise ConfigError(f"model.num_head_channels: {cfg.num_head_channels} does not "
                                  f"divide the {c} channels of attention in block {p.spec.name}")
            if cfg.num_head_channels <= 0 and c % cfg.num_heads:
                raise ConfigError(f"model.num_heads: {cfg.num_heads} does not divide the {c} "
                                  f"channels of attention in block {p.spec.name}")


# --------------------------------------------------------------------------- costs


def _conv_macs(res: int, k: int, cin: int, cout: int) -> int:
    return res * res * k * k * cin * cout


def _attn_macs(res: int, c: int) -> int:
    """qkv and proj_out (4 HW C^2) plus q k^T and weights v (2 (HW)^2 C), any head count."""
    n = res * res
    return 4 * n * c * c + 2 * n * n * c


def _res_macs(cfg: ModelConfig, p: BlockPlan) -> int:
    cin, cout, r = p.in_channels + p.skip_channels, p.out_channels, p.out_resolution
    macs = _conv_macs(r, 3, cin, cout) + _conv_macs(r, 3, cout, cout)
    macs += 4 * cfg.ch * cout * (2 if cfg.use_scale_shift_norm else 1)
    if cin != cout:
        macs += _conv_macs(r, 1, cin, cout)
    if p.attention:
        macs += _attn_macs(r, cout)
    return macs


def block_flops(cfg: ModelConfig, p: BlockPlan) -> int:
    """Forward FLOPs per example (2 x multiply-accumulates of convs, dense layers and
    attention matmuls; normalisation and elementwise ops are not counted)."""
    if p.kind == "embed":
        macs = cfg.ch * 4 * cfg.ch + 16 * cfg.ch * cfg.ch
    elif p.kind in ("in_conv", "out"):
        macs = _conv_macs(p.resolution, 3, p.in_channels, p.out_channels)
    elif p.kind == "attn":
        macs = _attn_macs(p.resolution, p.in_channels)
    elif p.kind == "res" or cfg.resblock_updown:
        macs = _res_macs(cfg, p)
    elif not cfg.resamp_with_conv:
        macs = 0
    else:  # conv resampling runs at the output resolution
        macs = _conv_macs(p.out_resolution, 3, p.in_channels, p.out_channels)
    return 2 * macs


def output_shape(p: BlockPlan) -> Tuple[int, ...]:
    """Per-example shape of the tensor the block writes."""
    if p.kind == "embed":
        return (p.out_channels,)
    return (p.out_resolution, p.out_resolution, p.out_channels)


def input_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Per-example shapes of the U-Net's inputs: ``x_t [R, R, C]``, ``t``, ``key`` (, ``y``)."""
    shapes: Dict[str, Tuple[int, ...]] = {
        "x_t": (cfg.image_size, cfg.image_size, cfg.in_channels), "t": (), "key": ()}
    if cfg.num_classes > 0:
        shapes["y"] = ()
    return shapes


def shapes_before(cfg: ModelConfig, plans: List[BlockPlan], index: int) -> Dict[str, Tuple[int, ...]]:
    """Per-example shape of every carry key defined before block ``index`` (``h`` changes
    shape along the up path, so shapes depend on the position)."""
    shapes = input_shapes(cfg)
    for p in plans[:index]:
        shapes[p.spec.outputs[0]] = output_shape(p)
    return shapes
