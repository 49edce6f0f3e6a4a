"""diffusers ``UNet2DModel`` / ``DDPMScheduler`` configs -> our ModelConfig / DiffusionConfig.

Checked against diffusers 0.42 (models/unets/unet_2d.py, unet_2d_blocks.py, resnet.py,
attention_processor.py, embeddings.py, downsampling.py, upsampling.py;
schedulers/scheduling_ddpm.py). A field missing from a config.json takes UNet2DModel's
default (:data:`UNET_DEFAULTS`), as diffusers does. Our U-Net is Ho et al.'s (2020) TF
network; a UNet2DModel computes the same function only with these settings (the values
of google's DDPM ports), so every other value is refused with a ConfigError naming the
field:

- ``time_embedding_type`` positional, ``flip_sin_to_cos`` false, ``freq_shift`` 1: DDPM's
  ``get_timestep_embedding``, ``[sin(t w_i), cos(t w_i)]`` with ``w_i = 10000^(-i/(d/2 - 1))``
  (diffusers' defaults, true and 0, give ``[cos, sin]`` and ``10000^(-i/(d/2))``);
- ``downsample_padding`` 0: a stride-2 conv on the input padded by one row and column at
  the bottom and right (TF "SAME", as DDPM); diffusers' default 1 pads every side;
- ``norm_eps`` 1e-6 (tf.contrib group_norm's, DDPM's; diffusers' default is 1e-5);
- ``resnet_time_scale_shift`` default: the time projection added to h before norm2 (DDPM);
  "scale_shift" would also drop the mid attention's GroupNorm when ``attn_norm_num_groups``
  is unset, which our block does not do;
- ``mid_block_scale_factor`` 1 (no division of the residual sums), ``act_fn`` silu,
  ``center_input_sample`` false, no class embedding, the mid block with its attention,
  conv resampling, block types DownBlock2D / AttnDownBlock2D / UpBlock2D / AttnUpBlock2D
  with the up path's attention mirroring the down path's (one ``attn_resolutions`` for both).
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ipu_diffusion.config import (ConfigError, DiffusionConfig, ModelConfig, RunConfig,
                                  config_from_dict, to_dict)
from ipu_diffusion.models.plan import plan_unet

# UNet2DModel.__init__'s defaults (diffusers 0.42), for fields a config.json leaves out.
UNET_DEFAULTS: Dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}
NORM_EPS = 1e-6  # ipu_diffusion.models.norm.GROUP_NORM_EPSILON

# field -> (the accepted values, what they mean in our network)
_FIXED: Dict[str, Tuple[Tuple[Any, ...], str]] = {
    "time_embedding_type": (("positional",), "the sinusoidal timestep embedding"),
    "flip_sin_to_cos": ((False,), "the embedding is [sin, cos] (DDPM's order)"),
    "freq_shift": ((1,), "frequencies 10000^(-i / (d/2 - 1)) as in DDPM"),
    "center_input_sample": ((False,), "inputs are already in [-1, 1]"),
    "act_fn": (("silu", "swish"), "swish throughout"),
    "class_embed_type": ((None,), "unconditional models only"),
    "num_class_embeds": ((None,), "unconditional models only"),
    "mid_block_type": (("UNetMidBlock2D",), "the middle is ResBlock, attention, ResBlock"),
    "add_attention": ((True,), "the middle always has its attention"),
    "mid_block_scale_factor": ((1,), "residual sums are not rescaled"),
    "resnet_time_scale_shift": (("default",), "the time projection is added before the "
                                "second GroupNorm (DDPM)"),
}
_DOWN, _ATTN_DOWN, _UP, _ATTN_UP = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"


def _show(value: Any) -> str:
    return json.dumps(value)


def _refuse(source: str, field: str, value: Any, supported: str) -> ConfigError:
    return ConfigError(f"{source}: {field}: {_show(value)} is not supported; {supported}")


def _same(value: Any, allowed: Sequence[Any]) -> bool:
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


def _fields(config: Dict[str, Any], source: str) -> Dict[str, Any]:
    """config.json over UNet2DModel's defaults; ConfigError for another class or an unknown
    field (a newer diffusers option this importer does not know)."""
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise _refuse(source, "_class_name", cls, "only UNet2DModel (the DDPM U-Net) is imported")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in UNET_DEFAULTS)
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}: unknown UNet2DModel field; this importer "
                          f"knows {', '.join(sorted(UNET_DEFAULTS))}")
    return {**UNET_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}


def _block_types(f: Dict[str, Any], source: str) -> List[bool]:
    """Per level, whether it has attention; checks the block types and their mirroring."""
    down, up = list(f["down_block_types"]), list(f["up_block_types"])
    channels = f["block_out_channels"]
    for field, types, plain, attn in (("down_block_types", down, _DOWN, _ATTN_DOWN),
                                      ("up_block_types", up, _UP, _ATTN_UP)):
        for t in types:
            if (t[7:] if t.startswith("UNetRes") else t) not in (plain, attn):
                raise _refuse(source, field, types, f"each block must be {plain} or {attn} "
                              f"(not {t})")
    if not (len(down) == len(up) == len(channels)) or not channels:
        raise _refuse(source, "up_block_types", up, f"give one down block, one up block and one "
                      f"block_out_channels entry per level ({len(down)}, {len(up)}, {len(channels)})")
    attention = [t.endswith(_ATTN_DOWN) for t in down]
    mirrored = [t.endswith(_ATTN_UP) for t in reversed(up)]
    if attention != mirrored:
        want = [_ATTN_UP if a else _UP for a in reversed(attention)]
        raise _refuse(source, "up_block_types", up, "attention on the up path must mirror the "
                      f"down path's (one attn_resolutions for both): {_show(want)}")
    return attention


def _check_fixed(f: Dict[str, Any], attention: List[bool], source: str) -> None:
    for field, (allowed, meaning) in _FIXED.items():
        if not _same(f[field], allowed):
            choices = " or ".join(_show(a) for a in allowed)
            raise _refuse(source, field, f[field], f"supported: {choices} ({meaning})")
    levels = len(attention)
    if levels > 1 and f["downsample_padding"] != 0:
        raise _refuse(source, "downsample_padding", f["downsample_padding"], "supported: 0 (the "
                      "stride-2 conv pads one row and column at the bottom and right, as DDPM)")
    if any(attention[:-1]) and f["downsample_type"] != "conv":  # read by AttnDownBlock2D only
        raise _refuse(source, "downsample_type", f["downsample_type"], 'supported: "conv"')
    if any(attention[1:]) and f["upsample_type"] != "conv":  # read by AttnUpBlock2D only
        raise _refuse(source, "upsample_type", f["upsample_type"], 'supported: "conv"')
    eps = f["norm_eps"]
    if not isinstance(eps, (int, float)) or not math.isclose(eps, NORM_EPS, rel_tol=1e-6):
        raise _refuse(source, "norm_eps", eps, f"supported: {NORM_EPS} (GroupNorm's epsilon "
                      "in our U-Net, as in DDPM)")
    groups = f["norm_num_groups"]
    if f["attn_norm_num_groups"] not in (None, groups):
        raise _refuse(source, "attn_norm_num_groups", f["attn_norm_num_groups"],
                      f"supported: null or norm_num_groups ({_show(groups)})")


def _channels(f: Dict[str, Any], source: str) -> Tuple[int, Tuple[int, ...]]:
    boc = f["block_out_channels"]
    ch = boc[0]
    if any(not isinstance(c, int) or c <= 0 or c % ch for c in boc):
        raise _refuse(source, "block_out_channels", boc, "each must be a positive multiple of "
                      "the first (our channels are ch * ch_mult)")
    dim = f["time_embedding_dim"]
    if dim not in (None, 4 * ch):
        raise _refuse(source, "time_embedding_dim", dim, f"supported: null or 4 x "
                      f"block_out_channels[0] = {4 * ch}")
    return ch, tuple(c // ch for c in boc)


def _int(f: Dict[str, Any], field: str, source: str) -> int:
    value = f[field]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _refuse(source, field, value, "expected a positive integer")
    return value


def _number(f: Dict[str, Any], field: str, source: str) -> float:
    value = f[field]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _refuse(source, field, value, "expected a number")
    return float(value)


def _image_size(f: Dict[str, Any], source: str) -> int:
    size = f["sample_size"]
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise _refuse(source, "sample_size", f["sample_size"], "give the image size, one "
                      "integer (square images)")
    return size


def model_config_from_diffusers(config: Dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a UNet2DModel config.json (a dict); ConfigError naming the field
    for anything our U-Net does not compute identically."""
    f = _fields(config, source)
    attention = _block_types(f, source)
    _check_fixed(f, attention, source)
    ch, ch_mult = _channels(f, source)
    size = _image_size(f, source)
    cin, cout = _int(f, "in_channels", source), _int(f, "out_channels", source)
    if cout not in (cin, 2 * cin):
        raise _refuse(source, "out_channels", cout, f"supported: in_channels ({cin}, the noise) "
                      f"or 2 x in_channels ({2 * cin}, noise and variance; learned_range)")
    head_dim = f["attention_head_dim"]
    widths = [ch * m for m, a in zip(ch_mult, attention) if a] + [ch * ch_mult[-1]]  # + mid
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim <= 0
                                 or any(w % head_dim for w in widths)):
        raise _refuse(source, "attention_head_dim", head_dim, "supported: null (one head) or "
                      "a width that divides the channels of every attention layer")
    model = ModelConfig(
        image_size=size, in_channels=cin, ch=ch, ch_mult=ch_mult,
        num_res_blocks=_int(f, "layers_per_block", source),
        attn_resolutions=tuple(size // 2 ** level for level, a in enumerate(attention) if a),
        num_heads=1, num_head_channels=-1 if head_dim is None else head_dim,
        dropout=_number(f, "dropout", source), resamp_with_conv=True, resblock_updown=False,
        use_scale_shift_norm=False, learn_sigma=cout == 2 * cin, num_classes=0,
        num_groups=_int(f, "norm_num_groups", source))
    try:
        plan_unet(model)  # geometry: size vs levels, GroupNorm divisibility
    except ConfigError as e:
        raise ConfigError(f"{source}: this UNet2DModel does not fit our U-Net: {e}") from None
    return model


# --------------------------------------------------------------------------- the scheduler

# DDPMScheduler.__init__'s defaults (diffusers 0.42), for fields (or a file) left out.
SCHEDULER_DEFAULTS: Dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "variance_type": "fixed_small",
    "clip_sample": True, "prediction_type": "epsilon", "thresholding": False,
    "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
}
# diffusers' beta_schedule -> ours (ipu_diffusion/diffusion/schedules.py: the same formulas;
# squaredcos_cap_v2 is N&D's cosine with s = 0.008 and betas capped at 0.999, as ours)
_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "sigmoid": "sigmoid",
              "squaredcos_cap_v2": "cosine"}
# *_log only changes how diffusers computes the same variance
_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
              "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
              "learned_range": "learned_range"}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# Ho et al. 2020, section 4 (schedules.py): 1e-4 .. 0.02 at T = 1000, both scaled by 1000 / T
_BETA_ENDS = (("beta_start", 1e-4), ("beta_end", 0.02))


def _choice(f: Dict[str, Any], field: str, table: Dict[str, str], source: str) -> str:
    if f[field] not in table:
        raise _refuse(source, field, f[field], "supported: " + ", ".join(_show(k) for k in table))
    return table[f[field]]


def _check_betas(f: Dict[str, Any], timesteps: int, source: str) -> None:
    if f["trained_betas"] is not None:
        raise ConfigError(f"{source}: trained_betas: a table of betas is not supported; "
                          "supported: null and a beta_schedule")
    if f["rescale_betas_zero_snr"]:
        raise _refuse(source, "rescale_betas_zero_snr", True, "supported: false")
    if f["beta_schedule"] == "squaredcos_cap_v2":
        return  # beta_start / beta_end unused
    for field, value in _BETA_ENDS:
        want = value * 1000.0 / timesteps
        got = f[field]
        if not isinstance(got, (int, float)) or not math.isclose(got, want, rel_tol=1e-6):
            raise _refuse(source, field, got, f"our {_show(f['beta_schedule'])} schedule runs "
                          f"from 1e-4 to 0.02 scaled by 1000 / T ({field} {want:g} at "
                          f"num_train_timesteps {timesteps})")


def _scheduler_notes(f: Dict[str, Any], unknown: List[str], source: str) -> List[str]:
    notes = []
    if not f["clip_sample"] or f["clip_sample_range"] != 1.0 or f["thresholding"]:
        notes.append(f"{source}: clip_sample {_show(f['clip_sample'])}, clip_sample_range "
                     f"{_show(f['clip_sample_range'])}, thresholding {_show(f['thresholding'])} "
                     "not followed: our samplers clip the predicted x0 to [-1, 1] (as DDPM's)")
    if unknown:
        notes.append(f"{source}: {', '.join(unknown)} ignored (not DDPMScheduler fields)")
    return notes


def diffusion_config_from_scheduler(scheduler: Optional[Dict[str, Any]], model: ModelConfig,
                                    source: str = "scheduler_config.json",
                                    model_source: str = "config.json"
                                    ) -> Tuple[DiffusionConfig, List[str]]:
    """``(DiffusionConfig, notes)`` for a DDPMScheduler config (a dict, or None: the file is
    absent and DDPMScheduler's defaults apply). ConfigError naming the field for a schedule,
    variance or prediction we do not have; ``notes`` list the sampler-side options that our
    samplers do not follow. timestep_spacing, steps_offset, sample_max_value and
    dynamic_thresholding_ratio set up diffusers' own sampling and are ignored (ours respace
    the schedule themselves, diffusion/respace.py)."""
    config = {} if scheduler is None else scheduler
    cls = config.get("_class_name", "DDPMScheduler")
    if cls != "DDPMScheduler":
        raise _refuse(source, "_class_name", cls, "only a DDPMScheduler config (the training "
                      "schedule) is read")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in SCHEDULER_DEFAULTS)
    f = {**SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if k in SCHEDULER_DEFAULTS}}
    timesteps = _int(f, "num_train_timesteps", source)
    _check_betas(f, timesteps, source)
    var_type = _choice(f, "variance_type", _VARIANCES, source)
    if (var_type == "learned_range") != model.learn_sigma:
        where = source if scheduler is not None else f"{source} (absent: DDPMScheduler's default)"
        out = model.in_channels * (2 if model.learn_sigma else 1)
        raise _refuse(where, "variance_type", f["variance_type"],
                      f"{model_source} out_channels {out} needs "
                      + ('"learned_range"' if model.learn_sigma else
                         "a fixed variance (learned_range needs 2 x in_channels)"))
    diffusion = DiffusionConfig(
        schedule=_choice(f, "beta_schedule", _SCHEDULES, source), timesteps=timesteps,
        mean_type=_choice(f, "prediction_type", _PREDICTIONS, source), var_type=var_type,
        loss_type="hybrid" if var_type == "learned_range" else "mse")
    notes = _scheduler_notes(f, unknown, source)
    if scheduler is None:
        notes.append(f"no {source}: DDPMScheduler's defaults (linear betas 1e-4..0.02, T 1000, "
                     "fixed_small, epsilon)")
    return diffusion, notes


# --------------------------------------------------------------------------- the run config

# What --set may change on an imported model: how it is trained and sampled, not the
# network (var_type between the fixed variances only: learned_range needs its output
# channels, and config validation ties the two together).
_FREE = {"model": ("dropout",),
         "diffusion": ("var_type", "loss_type", "hybrid_lambda", "min_snr_gamma",
                       "timestep_sampler")}


def run_config(model: ModelConfig, diffusion: DiffusionConfig, overrides: Sequence[str] = (),
               name: str = "diffusers") -> RunConfig:
    """A run config with the imported model and diffusion sections, the defaults elsewhere,
    and ``overrides`` (``a.b=c``), which may not change the imported network."""
    imported = {"model": to_dict(model), "diffusion": to_dict(diffusion)}
    cfg = config_from_dict({"run": {"name": name}, **imported}, overrides)
    for section, values in imported.items():
        now = to_dict(getattr(cfg, section))
        for key, value in values.items():
            if key not in _FREE[section] and now[key] != value:
                raise ConfigError(
                    f"--set {section}.{key}: {now[key]!r} would change the imported network "
                    f"({section}.{key} is {value!r}, from the diffusers configs); --set may "
                    f"change {', '.join(section + '.' + k for k in _FREE[section])} and any key "
                    "outside model and diffusion")
    return cfg
