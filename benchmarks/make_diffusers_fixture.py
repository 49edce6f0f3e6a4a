"""Fixtures for tests/models/test_diffusers_import.py: small random diffusers ``UNet2DModel``s
of the DDPM family, saved as diffusers saves them, with their outputs on fixed inputs.

    # under .venv-torch only (torch + diffusers + safetensors; never imports TensorFlow)
    .venv-torch/bin/python benchmarks/make_diffusers_fixture.py

Writes (a few hundred KB in all; run once, the files are committed):

- ``tests/fixtures/diffusers_small/``: the layout of google/ddpm-cifar10-32 shrunk --
  block_out_channels (8, 16, 16), layers_per_block 2, attention at the second level
  (8x8 of a 16x16 image; AttnDownBlock2D / AttnUpBlock2D, one head: attention_head_dim
  None) and in the mid block, GroupNorm 4 groups eps 1e-6, downsample_padding 0,
  flip_sin_to_cos False, freq_shift 1, dropout 0.1 -- with that model's DDPMScheduler
  (linear 1e-4..0.02, T 1000, fixed_small, epsilon);
- ``tests/fixtures/diffusers_heads/``: several attention heads (attention_head_dim 2), attention
  at every level (including an AttnDownBlock2D that downsamples and an AttnUpBlock2D that
  upsamples), out_channels = 2 x in_channels with a learned_range, squaredcos_cap_v2,
  v_prediction scheduler;

each as ``config.json`` + ``diffusion_pytorch_model.safetensors`` (``save_pretrained``),
``scheduler_config.json`` and ``expected.npz``: ``x`` float32 [2, C, H, W] (NCHW, as
diffusers takes it), ``t`` int64 [4, 2] (one row per call, a timestep per example: every
t in {0, 10, 500, 999} for both examples) and ``out`` float32 [4, 2, C_out, H, W], the
model's ``.sample`` in eval mode (dropout off).

Every parameter is random: diffusers' default initialisation (PyTorch's, nothing zero)
and GroupNorm scales 1 + 0.2 N(0, 1), shifts 0.2 N(0, 1), so a swapped or misplaced
tensor in the import changes the outputs.

Also ``tests/fixtures/diffusers_small/ddpm_cifar10_32_shapes.json``: the name and shape of
every tensor of google/ddpm-cifar10-32's ``UNet2DModel`` (its config.json, repeated in
``CIFAR10_32_CONFIG`` below and in the test) and the parameter count, from building that
model here (no weights).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch_cifar_step import UNET_CONFIG  # noqa: E402 (benchmarks/ is on the path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TIMESTEPS = [[0, 999], [10, 500], [500, 10], [999, 0]]  # [call, example]

# google/ddpm-cifar10-32's config.json, as the PyTorch step benchmark builds it, without
# the paper's dropout (the hub file has no dropout field)
CIFAR10_32_CONFIG = {k: v for k, v in UNET_CONFIG.items() if k != "dropout"}
# google/ddpm-cifar10-32's scheduler_config.json
CIFAR10_32_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                            beta_schedule="linear", variance_type="fixed_small",
                            clip_sample=True)

DDPM_FAMILY = dict(time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
                   downsample_padding=0, act_fn="silu", norm_eps=1e-6, mid_block_scale_factor=1)

MODELS = {
    "diffusers_small": (
        dict(DDPM_FAMILY, sample_size=16, in_channels=3, out_channels=3,
             block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
             down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
             attention_head_dim=None, dropout=0.1),
        CIFAR10_32_SCHEDULER),
    "diffusers_heads": (
        dict(DDPM_FAMILY, sample_size=8, in_channels=3, out_channels=6,
             block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2,
             down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), attention_head_dim=2),
        dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
             variance_type="learned_range", prediction_type="v_prediction", clip_sample=True)),
}


def randomise_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """GroupNorm scale 1 + 0.2 N(0, 1) and shift 0.2 N(0, 1) (their defaults are 1 and 0)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1.0 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))


def make_fixture(name: str, unet_config: dict, scheduler_config: dict, seed: int) -> None:
    out_dir = os.path.join(FIXTURES, name)
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    model = UNet2DModel(**unet_config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    randomise_norms(model, generator)
    model.save_pretrained(out_dir, safe_serialization=True)
    DDPMScheduler(**scheduler_config).save_pretrained(out_dir)
    size = unet_config["sample_size"]
    x = torch.randn((2, unet_config["in_channels"], size, size), generator=generator)
    t = torch.tensor(TIMESTEPS, dtype=torch.int64)
    with torch.no_grad():
        out = torch.stack([model(x, row).sample for row in t])
    np.savez_compressed(os.path.join(out_dir, "expected.npz"), x=x.numpy().astype(np.float32),
                        t=t.numpy(), out=out.numpy().astype(np.float32))
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out_dir}: {params:,} parameters, |out| max {out.abs().max().item():.3f}")


def write_cifar_shapes() -> None:
    model = UNet2DModel(**CIFAR10_32_CONFIG)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    record = {"source": "UNet2DModel(**CIFAR10_32_CONFIG) of benchmarks/make_diffusers_fixture.py",
              "params": sum(p.numel() for p in model.parameters()), "shapes": shapes}
    path = os.path.join(FIXTURES, "diffusers_small", "ddpm_cifar10_32_shapes.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=0, sort_keys=True)
        f.write("\n")
    print(f"wrote {path}: {len(shapes)} tensors, {record['params']:,} parameters")


def main() -> None:
    torch.set_num_threads(1)
    for i, (name, (unet_config, scheduler_config)) in enumerate(MODELS.items()):
        make_fixture(name, unet_config, scheduler_config, seed=10 * i)
    write_cifar_shapes()


if __name__ == "__main__":
    main()
