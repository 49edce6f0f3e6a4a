"""Import a Hugging Face diffusers ``UNet2DModel`` of the DDPM family (google/ddpm-cifar10-32,
google/ddpm-cat-256, ...) from a local folder: its configs and its weights.

    imported = read_diffusers_dir("ddpm-cifar10-32")   # config.json, weights, scheduler_config.json
    cfg = imported.run_config(["data.source=npz", "data.path=cifar10.npz"])
    unet = build_unet(cfg.model)
    load_weights(unet, imported.tensors)

``python -m ipu_diffusion import-diffusers --model-dir DIR --workdir OUT`` writes a run
directory from it that ``sample``, ``eval`` and ``train --resume`` (fine-tuning) accept.

Tensors (diffusers name -> our block and layer, :mod:`ipu_diffusion.models.plan`), with
``L`` levels; Conv2d ``[O, I, kh, kw]`` -> Conv2D ``[kh, kw, I, O]``, Linear ``[out, in]`` ->
Dense ``[in, out]``, GroupNorm weight/bias -> gamma/beta:

    time_embedding.linear_1, linear_2      embed.dense0, dense1
    conv_in                                in_conv
    down_blocks.l.resnets.i                down{l}_res{i}.res: norm1, conv1, time_emb_proj ->
                                           emb_proj, norm2, conv2, conv_shortcut -> skip
    down_blocks.l.attentions.i             down{l}_res{i}.attn: group_norm -> norm,
                                           [to_q | to_k | to_v] -> qkv, to_out.0 -> proj_out
                                           (1x1 convs; old files: query, key, value, proj_attn)
    down_blocks.l.downsamplers.0.conv      down{l}_down.conv
    mid_block.resnets.0, attentions.0, resnets.1    mid_res0, mid_attn, mid_res1
    up_blocks.j.resnets.i (+ attentions.i) up{L-1-j}_res{i}
    up_blocks.j.upsamplers.0.conv          up{L-1-j}_up.conv
    conv_norm_out, conv_out                out.norm, out.conv

The networks compute the same function exactly when the config holds the settings of Ho
et al.'s code, which google's DDPM ports use: the config checks in
:mod:`ipu_diffusion.inference.diffusers_config` refuse every other setting with one
ConfigError naming the config.json field.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ipu_diffusion.config import ConfigError, DiffusionConfig, ModelConfig, RunConfig
from ipu_diffusion.inference.diffusers_config import (diffusion_config_from_scheduler,
                                                      model_config_from_diffusers, run_config)
from ipu_diffusion.models.plan import plan_unet

CONFIG_NAME = "config.json"
SCHEDULER_NAME = "scheduler_config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
# diffusers renamed the attention of UNet2DModel (modeling_utils._fix_state_dict_keys_on_load)
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass(frozen=True)
class DiffusersModel:
    """A diffusers UNet2DModel folder, read and checked: our configs and its tensors
    (diffusers names, float32 numpy, attention under its current names)."""

    model: ModelConfig
    diffusion: DiffusionConfig
    tensors: Dict[str, np.ndarray]
    notes: Tuple[str, ...]  # what the import does not follow (sampler-side scheduler options)
    model_dir: str

    def run_config(self, overrides: Sequence[str] = (), name: str = "") -> RunConfig:
        """The run config of this model (``--set`` overrides that keep the network)."""
        return run_config(self.model, self.diffusion, overrides, name or _run_name(self.model_dir))


def _run_name(model_dir: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.abspath(model_dir)))
    return name.strip("._") or "diffusers"


# --------------------------------------------------------------------------- reading


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of settings")
    return data


def _locate(model_dir: str) -> Tuple[str, Optional[str]]:
    """``(folder with config.json and the weights, scheduler_config.json or None)``: the
    folder itself, or a pipeline folder's ``unet/`` and ``scheduler/``."""
    if not os.path.isdir(model_dir):
        raise ConfigError(f"--model-dir {model_dir}: not a directory")
    unet_dir = model_dir
    if not os.path.isfile(os.path.join(model_dir, CONFIG_NAME)) and \
            os.path.isfile(os.path.join(model_dir, "unet", CONFIG_NAME)):
        unet_dir = os.path.join(model_dir, "unet")
    if not os.path.isfile(os.path.join(unet_dir, CONFIG_NAME)):
        raise ConfigError(f"--model-dir {model_dir}: no {CONFIG_NAME}; expected a diffusers "
                          f"UNet2DModel folder ({CONFIG_NAME} + {WEIGHTS_NAMES[0]})")
    for candidate in (os.path.join(unet_dir, SCHEDULER_NAME),
                      os.path.join(model_dir, "scheduler", SCHEDULER_NAME)):
        if os.path.isfile(candidate):
            return unet_dir, candidate
    return unet_dir, None


def _load_tensors(unet_dir: str) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    for name in WEIGHTS_NAMES:
        path = os.path.join(unet_dir, name)
        if os.path.isfile(path):
            break
    else:
        have = [f for f in sorted(os.listdir(unet_dir)) if f.startswith("diffusion_pytorch_model")]
        raise ConfigError(f"{unet_dir}: no {WEIGHTS_NAMES[0]}"
                          + (f" (it holds {', '.join(have)}; only the safetensors format is "
                             "read: download that file too)" if have else ""))
    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
        raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None
    return {_current_name(k): np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def _current_name(name: str) -> str:
    """``...attentions.0.query.weight`` -> ``...attentions.0.to_q.weight`` (older files)."""
    m = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", name)
    return f"{m.group(1)}.{_LEGACY_ATTENTION[m.group(2)]}.{m.group(3)}" if m else name


def read_diffusers_dir(model_dir: str) -> DiffusersModel:
    """Read and check a local diffusers UNet2DModel folder (``config.json``,
    ``diffusion_pytorch_model.safetensors``, optional ``scheduler_config.json`` beside it
    or in ``../scheduler/``). Raises ConfigError naming the file and field for a setting
    outside the DDPM family, and for a missing, extra or misshapen tensor."""
    unet_dir, scheduler_path = _locate(model_dir)
    config_path = os.path.join(unet_dir, CONFIG_NAME)
    model = model_config_from_diffusers(_read_json(config_path), config_path)
    scheduler = _read_json(scheduler_path) if scheduler_path else None
    diffusion, notes = diffusion_config_from_scheduler(
        scheduler, model, scheduler_path or os.path.join(unet_dir, SCHEDULER_NAME), config_path)
    tensors = _load_tensors(unet_dir)
    check_tensors(model, {k: v.shape for k, v in tensors.items()}, unet_dir)
    return DiffusersModel(model, diffusion, tensors, tuple(notes), model_dir)


# --------------------------------------------------------------------------- the tensor map


@dataclass(frozen=True)
class _Entry:
    """One variable of ours from one or more diffusers tensors (joined on the output axis)."""

    block: str  # our block name
    attr: str  # attribute path from the block's layer to the variable
    sources: Tuple[str, ...]  # diffusers tensor names
    kind: str  # conv (OIHW), linear ([out, in]), attn (linear -> 1x1 conv), vector
    shape: Tuple[int, ...]  # the torch shape of each source


def _conv(block, attr, prefix, cout, cin, k) -> List[_Entry]:
    at = attr + "." if attr else ""
    return [_Entry(block, at + "kernel", (prefix + ".weight",), "conv", (cout, cin, k, k)),
            _Entry(block, at + "bias", (prefix + ".bias",), "vector", (cout,))]


def _linear(block, attr, prefix, out, inp) -> List[_Entry]:
    return [_Entry(block, attr + ".kernel", (prefix + ".weight",), "linear", (out, inp)),
            _Entry(block, attr + ".bias", (prefix + ".bias",), "vector", (out,))]


def _norm(block, attr, prefix, c) -> List[_Entry]:
    return [_Entry(block, attr + ".gamma", (prefix + ".weight",), "vector", (c,)),
            _Entry(block, attr + ".beta", (prefix + ".bias",), "vector", (c,))]


def _resnet(block, attr, prefix, cin, cout, emb) -> List[_Entry]:
    """ResnetBlock2D -> ResBlock (pre-norm; the embedding added before norm2)."""
    a = attr + "."
    entries = (_norm(block, a + "norm1", prefix + ".norm1", cin)
               + _conv(block, a + "conv1", prefix + ".conv1", cout, cin, 3)
               + _linear(block, a + "emb_proj", prefix + ".time_emb_proj", cout, emb)
               + _norm(block, a + "norm2", prefix + ".norm2", cout)
               + _conv(block, a + "conv2", prefix + ".conv2", cout, cout, 3))
    if cin != cout:
        entries += _conv(block, a + "skip", prefix + ".conv_shortcut", cout, cin, 1)
    return entries


def _attention(block, attr, prefix, c) -> List[_Entry]:
    """Attention (group_norm, to_q/k/v, to_out.0) -> AttentionBlock (norm, qkv, proj_out):
    our qkv output channels are ordered (q | k | v, head, d), theirs (head, d) each."""
    a = attr + "." if attr else ""
    qkv = tuple(f"{prefix}.{n}" for n in ("to_q", "to_k", "to_v"))
    return (_norm(block, a + "norm", prefix + ".group_norm", c)
            + [_Entry(block, a + "qkv.kernel", tuple(n + ".weight" for n in qkv), "attn", (c, c)),
               _Entry(block, a + "qkv.bias", tuple(n + ".bias" for n in qkv), "vector", (c,)),
               _Entry(block, a + "proj_out.kernel", (prefix + ".to_out.0.weight",), "attn", (c, c)),
               _Entry(block, a + "proj_out.bias", (prefix + ".to_out.0.bias",), "vector", (c,))])


def _res_prefixes(name: str, levels: int) -> Tuple[str, str]:
    """Our residual block name -> its diffusers resnet and attention prefixes."""
    m = re.fullmatch(r"mid_res(\d+)", name)
    if m:
        return f"mid_block.resnets.{m.group(1)}", ""
    path, level, i = re.fullmatch(r"(down|up)(\d+)_res(\d+)", name).groups()
    index = int(level) if path == "down" else levels - 1 - int(level)
    return f"{path}_blocks.{index}.resnets.{i}", f"{path}_blocks.{index}.attentions.{i}"


def tensor_map(cfg: ModelConfig) -> List[_Entry]:
    """Every variable of ``build_unet(cfg)`` with the diffusers tensors it is made from."""
    levels, emb = len(cfg.ch_mult), 4 * cfg.ch
    entries: List[_Entry] = []
    for p in plan_unet(cfg):
        name = p.spec.name
        if p.kind == "embed":
            entries += (_linear(name, "dense0", "time_embedding.linear_1", emb, cfg.ch)
                        + _linear(name, "dense1", "time_embedding.linear_2", emb, emb))
        elif p.kind == "in_conv":
            entries += _conv(name, "", "conv_in", cfg.ch, cfg.in_channels, 3)
        elif p.kind == "res":
            res, attn = _res_prefixes(name, levels)
            entries += _resnet(name, "res", res, p.in_channels + p.skip_channels,
                               p.out_channels, emb)
            if p.attention:
                entries += _attention(name, "attn", attn, p.out_channels)
        elif p.kind == "attn":
            entries += _attention(name, "", "mid_block.attentions.0", p.in_channels)
        elif p.kind in ("down", "up"):
            level = int(re.match(r"(?:down|up)(\d+)", name).group(1))
            index = level if p.kind == "down" else levels - 1 - level
            prefix = f"{p.kind}_blocks.{index}.{p.kind}samplers.0.conv"
            entries += _conv(name, "conv", prefix, p.in_channels, p.in_channels, 3)
        else:  # out
            entries += (_norm(name, "norm", "conv_norm_out", p.in_channels)
                        + _conv(name, "conv", "conv_out", p.out_channels, p.in_channels, 3))
    return entries


def expected_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """diffusers tensor name -> torch shape, for the UNet2DModel that maps to ``cfg``."""
    return {name: e.shape for e in tensor_map(cfg) for name in e.sources}


def check_tensors(cfg: ModelConfig, shapes: Dict[str, Tuple[int, ...]], where: str) -> None:
    """ConfigError unless ``shapes`` (name -> shape) are exactly :func:`expected_shapes`."""
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    wrong = sorted(k for k in want if k in shapes and tuple(shapes[k]) != want[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing ({', '.join(missing[:4])})")
    if extra:
        problems.append(f"{len(extra)} tensor(s) this network does not have "
                        f"({', '.join(extra[:4])})")
    if wrong:
        problems.append(", ".join(f"{k} is {list(shapes[k])}, expected {list(want[k])}"
                                  for k in wrong[:4]))
    if problems:
        raise ConfigError(f"{where}: the weights do not fit the network its {CONFIG_NAME} "
                          "describes: " + "; ".join(problems))


# --------------------------------------------------------------------------- loading


def _converted(e: _Entry, tensors: Dict[str, np.ndarray]) -> np.ndarray:
    parts = [np.asarray(tensors[n], np.float32) for n in e.sources]
    if e.kind == "conv":
        return np.transpose(parts[0], (2, 3, 1, 0))  # OIHW -> HWIO
    if e.kind == "linear":
        return parts[0].T
    if e.kind == "attn":
        return np.concatenate([w.T for w in parts], axis=1)[None, None]  # [1, 1, C, n C]
    return np.concatenate(parts)


def _variable(layer, attr: str):
    for part in attr.split("."):
        layer = getattr(layer, part)
    return layer


def load_weights(unet, tensors: Dict[str, np.ndarray]) -> None:
    """Assign the diffusers ``tensors`` (checked by :func:`check_tensors`) to every
    trainable variable of ``unet`` (a :class:`~ipu_diffusion.models.unet.UNet`)."""
    assigned = set()
    for e in tensor_map(unet.config):
        var = _variable(unet.layers[e.block], e.attr)
        value = _converted(e, tensors)
        if tuple(var.shape) != value.shape:  # a mapping error, not a user's
            raise AssertionError(f"{e.block}.{e.attr}: {value.shape} for a "
                                 f"{tuple(var.shape)} variable")
        var.assign(value)
        assigned.add(id(var))
    left = [v.name for v in unet.trainable_variables if id(v) not in assigned]
    if left:
        raise AssertionError(f"variables without a diffusers tensor: {left[:4]}")
