"""The diffusion U-Net as an ordered list of named blocks over a carry.

``build_unet(model_config)`` returns a :class:`UNet`: the block list (see
:mod:`ipu_diffusion.models.plan` for the layout and carry keys), one Keras layer per block,
a functional ``keras_model`` over all blocks and, for any cut, one functional Keras model
per pipeline stage over the *same* layer objects (shared weights). The U-Net knows
nothing of noise schedules or devices (Ho et al. 2020, appendix B; Nichol & Dhariwal
2021; Dhariwal & Nichol 2021).

    unet = build_unet(cfg.model)
    eps = unet(x_t, t, key=keys, training=True)                 # [B, H, W, out_channels]
    stages = unet.stage_models(["down1_res0", "mid_res0"])     # dict in -> dict out
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from ipu_diffusion._keras import keras
from ipu_diffusion.config import ModelConfig
from ipu_diffusion.models import layers as L
from ipu_diffusion.models.carry import BlockSpec, check_defined, live_before, stage_ranges
from ipu_diffusion.models.plan import (BlockPlan, block_flops, input_shapes, num_heads_for,
                                       out_channels, output_shape, plan_unet, shapes_before)

_INT_KEYS = ("t", "key", "y")


def _res_block(cfg: ModelConfig, p: BlockPlan, zero_init: bool,
               resample: Optional[str] = None) -> L.ResAttnBlock:
    res = L.ResBlock(p.in_channels + p.skip_channels, p.out_channels, 4 * cfg.ch, cfg.num_groups,
                     cfg.dropout, salt_name=p.spec.name + "/dropout",
                     use_scale_shift_norm=cfg.use_scale_shift_norm, resample=resample,
                     zero_init=zero_init, name="res")
    attn = None
    if p.attention:
        attn = L.AttentionBlock(p.out_channels, num_heads_for(cfg, p.out_channels),
                                cfg.num_groups, zero_init=zero_init, name="attn")
    return L.ResAttnBlock(res, attn, concat_skip=p.skip_channels > 0, name=p.spec.name)


def make_block_layer(cfg: ModelConfig, p: BlockPlan, zero_init: bool = True) -> keras.layers.Layer:
    """The Keras layer that computes block ``p`` (named after the block)."""
    name = p.spec.name
    if p.kind == "embed":
        return L.TimestepEmbed(cfg.ch, cfg.num_classes, name=name)
    if p.kind == "in_conv":
        return L.conv(cfg.ch, 3, name)
    if p.kind == "res":
        return _res_block(cfg, p, zero_init)
    if p.kind in ("down", "up") and cfg.resblock_updown:
        return _res_block(cfg, p, zero_init, resample=p.kind)
    if p.kind == "down":
        return L.Downsample(p.in_channels, cfg.resamp_with_conv, name=name)
    if p.kind == "up":
        return L.Upsample(p.in_channels, cfg.resamp_with_conv, name=name)
    if p.kind == "attn":
        return L.AttentionBlock(p.in_channels, num_heads_for(cfg, p.in_channels), cfg.num_groups,
                                zero_init=zero_init, name=name)
    if p.kind == "out":
        return L.OutBlock(p.in_channels, p.out_channels, cfg.num_groups, zero_init=zero_init,
                          name=name)
    raise ValueError(f"unknown block kind {p.kind!r}")  # programming error


class UNet:
    """A U-Net over a carry. Public attributes:

    - ``blocks``: ``List[BlockSpec]`` in order; ``block_names``; ``plans`` (sizes per block);
    - ``input_keys``: ``("x_t", "t", "key"[, "y"])``; ``output_key``: ``"out"``;
    - ``out_channels``: ``2 * in_channels`` with ``learn_sigma``, else ``in_channels``;
    - ``keras_model``: functional model, dict ``{x_t [B,H,W,C] float32, t int32 [B],
      key int32 [B][, y int32 [B]]}`` -> ``out [B, H, W, out_channels]`` float32;
    - ``layers``: block name -> the Keras layer computing it (shared by every model).
    """

    def __init__(self, config: ModelConfig, zero_init: bool = True):
        self.config = config
        self.plans: List[BlockPlan] = plan_unet(config)
        self.blocks: List[BlockSpec] = [p.spec for p in self.plans]
        self.block_names: List[str] = [b.name for b in self.blocks]
        self.input_keys: Tuple[str, ...] = tuple(input_shapes(config))
        self.output_key = "out"
        self.out_channels = out_channels(config)
        check_defined(self.blocks, self.input_keys)
        self._live = live_before(self.blocks, (self.output_key,))
        self.layers: Dict[str, keras.layers.Layer] = {
            p.spec.name: make_block_layer(config, p, zero_init) for p in self.plans}
        self._compute_dtype = self.layers["in_conv"].compute_dtype
        self.keras_model = self._functional(0, len(self.blocks), "unet", whole=True)

    # ------------------------------------------------------------------ carry

    def carry_dtype(self, key: str) -> str:
        """int32 for ``t``/``key``/``y``; float32 for ``x_t`` and ``out``; else the compute
        dtype of the Keras dtype policy (e.g. bfloat16 under mixed_bfloat16)."""
        if key in _INT_KEYS:
            return "int32"
        if key in ("x_t", self.output_key):
            return "float32"
        return self._compute_dtype

    def live_keys(self, index: int) -> Tuple[str, ...]:
        """Carry keys that cross a cut before block ``index`` (``len(blocks)``: ``("out",)``)."""
        return self._live[index]

    def boundary_shapes(self, index: int) -> Dict[str, Tuple[int, ...]]:
        """Per-example shapes of the live carry keys before block ``index``."""
        shapes = shapes_before(self.config, self.plans, index)
        return {k: shapes[k] for k in self._live[index]}

    def input_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Per-example shapes of the input keys: ``x_t (H, W, C)``, ``t ()``, ``key ()``..."""
        return input_shapes(self.config)

    def _apply(self, p: BlockPlan, carry: Dict[str, tf.Tensor], training=None) -> None:
        args = [carry[k] for k in p.spec.inputs]
        layer = self.layers[p.spec.name]
        out = layer(args if len(args) > 1 else args[0], training=training)
        carry[p.spec.outputs[0]] = out

    def apply_blocks(self, carry: Dict[str, tf.Tensor], start: int = 0,
                     stop: Optional[int] = None, training=None) -> None:
        """Call blocks ``start .. stop - 1`` in order on ``carry`` (a dict of tensors or
        Keras inputs), writing each block's output into it: the flat graph a pipelined
        IPU model is built from (one layer invocation per block)."""
        for p in self.plans[start:stop]:
            self._apply(p, carry, training)

    def _functional(self, start: int, stop: int, name: str, whole: bool = False):
        shapes = shapes_before(self.config, self.plans, start)
        inputs = {k: keras.Input(shape=shapes[k], dtype=self.carry_dtype(k), name=k)
                  for k in (self.input_keys if whole else self._live[start])}
        carry = dict(inputs)
        self.apply_blocks(carry, start, stop)
        if whole:
            return keras.Model(inputs=inputs, outputs=carry[self.output_key], name=name)
        outputs = {k: carry[k] for k in self._live[stop]}
        return keras.Model(inputs=inputs, outputs=outputs, name=name)

    # ------------------------------------------------------------------ stages

    def stage_models(self, cuts: Sequence[str]) -> List[keras.Model]:
        """One functional model per stage; ``cuts`` name the first blocks of stages 1..S-1."""
        return self.stage_models_for_ranges(stage_ranges(self.blocks, cuts))

    def stage_models_for_ranges(self, ranges: Sequence[Tuple[int, int]]) -> List[keras.Model]:
        """One functional model per ``(start, stop)`` block range, over the shared layers.

        Stage inputs are the keys live before block ``start`` (dict of ``keras.Input``),
        outputs the keys live after block ``stop - 1``; the last stage outputs ``{"out"}``.
        """
        models = []
        for s, (start, stop) in enumerate(ranges):
            if not 0 <= start < stop <= len(self.blocks):
                raise ValueError(f"stage {s}: block range ({start}, {stop}) is empty or outside "
                                 f"0..{len(self.blocks)}")
            models.append(self._functional(start, stop, f"stage_{s}"))
        return models

    # ------------------------------------------------------------------ info

    def block_params(self, name: str) -> int:
        return int(sum(np.prod(v.shape) for v in self.layers[name].weights))

    def block_info(self) -> List[dict]:
        """Per block: ``name``, ``inputs``, ``outputs``, ``params`` (variables it owns),
        ``flops`` (forward, per example), ``output_shapes`` / ``output_dtypes`` (per
        example) of what it writes."""
        info = []
        for p in self.plans:
            key = p.spec.outputs[0]
            info.append({
                "name": p.spec.name, "inputs": p.spec.inputs, "outputs": p.spec.outputs,
                "params": self.block_params(p.spec.name),
                "flops": block_flops(self.config, p),
                "output_shapes": {key: output_shape(p)},
                "output_dtypes": {key: self.carry_dtype(key)},
            })
        return info

    def count_params(self) -> int:
        return int(sum(np.prod(v.shape) for v in self.trainable_variables))

    @property
    def trainable_variables(self) -> list:
        return self.keras_model.trainable_variables

    def save_weights(self, path: str) -> None:
        """HDF5 weights; use a path ending in ``.weights.h5`` (required by Keras 3)."""
        self.keras_model.save_weights(path)

    def load_weights(self, path: str) -> None:
        self.keras_model.load_weights(path)

    # ------------------------------------------------------------------ calling

    def __call__(self, x_t, t, y=None, key=None, training: bool = False) -> tf.Tensor:
        """``x_t [B, H, W, C]``, ``t int [B]`` (, ``y int [B]``, ``key int32 [B]``; zeros by
        default) -> ``[B, H, W, out_channels]`` float32."""
        n = self.config.num_classes
        if n > 0 and y is None:
            raise ValueError(f"this U-Net is class-conditional (model.num_classes={n}): pass "
                             f"y, int [B] labels in 0..{n} ({n} is the null label)")
        if n == 0 and y is not None:
            raise ValueError("this U-Net is unconditional (model.num_classes=0): y must be None")
        t = tf.cast(t, tf.int32)
        inputs = {"x_t": tf.convert_to_tensor(x_t, tf.float32), "t": t,
                  "key": tf.zeros_like(t) if key is None else tf.cast(key, tf.int32)}
        if y is not None:
            inputs["y"] = tf.cast(y, tf.int32)
        return self.keras_model(inputs, training=training)


def build_unet(model_config: ModelConfig, zero_init: bool = True) -> UNet:
    """Build the U-Net of ``model_config`` (raises ConfigError if the geometry does not fit).

    ``zero_init=False`` gives the usually zero-initialised convs (last conv of each residual
    block, attention output, output conv) the default variance-scaling initialisation, so
    every path carries signal from the start (useful for tests of gradients and
    conditioning); training uses the default ``True``.
    """
    return UNet(model_config, zero_init=zero_init)
