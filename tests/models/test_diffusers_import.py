"""Importing a diffusers UNet2DModel (ipu_diffusion/inference/diffusers_import.py): our U-Net
reproduces diffusers' own outputs, google/ddpm-cifar10-32's configuration maps onto the
reference U-Net tensor for tensor, settings outside the DDPM family are refused by field,
and ``import-diffusers`` writes a run directory that ``sample`` reads.

Expected values come from diffusers itself, not from this code: the folders in
tests/fixtures/diffusers_small/ and diffusers_heads/ are random UNet2DModels saved by
``save_pretrained`` with their outputs on fixed inputs, and
diffusers_small/ddpm_cifar10_32_shapes.json lists the tensors of google/ddpm-cifar10-32's
UNet2DModel; benchmarks/make_diffusers_fixture.py wrote them under .venv-torch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from ipu_diffusion.config import ConfigError, load_config
from ipu_diffusion.diffusion.schedules import make_betas
from ipu_diffusion.inference.diffusers_config import (diffusion_config_from_scheduler,
                                                      model_config_from_diffusers)
from ipu_diffusion.inference.diffusers_import import (expected_shapes, load_weights,
                                                      read_diffusers_dir)
from ipu_diffusion.models.unet import build_unet

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
SMALL = os.path.join(FIXTURES, "diffusers_small")
HEADS = os.path.join(FIXTURES, "diffusers_heads")
PRESETS = os.path.join(os.path.dirname(__file__), "..", "..", "pipeline_configs")

# google/ddpm-cifar10-32's config.json as published (diffusers' port of Ho et al.'s CIFAR-10
# model; the fields as printed in that file, the same values as
# benchmarks/torch_cifar_step.py's UNET_CONFIG)
CIFAR10_32 = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
    "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
CIFAR10_32_PARAMS = 35_746_307  # Ho et al.'s CIFAR-10 U-Net


def _max_abs_diff(folder: str) -> float:
    """Import ``folder`` and return max |ours - diffusers| over its saved calls."""
    imported = read_diffusers_dir(folder)
    unet = build_unet(imported.model)
    load_weights(unet, imported.tensors)
    saved = np.load(os.path.join(folder, "expected.npz"))
    x = np.transpose(saved["x"], (0, 2, 3, 1))  # NCHW -> NHWC
    worst = 0.0
    for t, want in zip(saved["t"], saved["out"]):
        got = unet(x, t.astype(np.int32)).numpy()
        assert got.shape == (2,) + want.shape[2:] + (want.shape[1],)
        worst = max(worst, float(np.abs(got - np.transpose(want, (0, 2, 3, 1))).max()))
    return worst


@pytest.mark.keras2
@pytest.mark.parametrize("folder", [SMALL, HEADS], ids=["ddpm_layout", "heads_learned_range"])
def test_outputs_match_diffusers(folder):
    # measured: 8.5e-7 (ddpm_layout) and 4.2e-7 (heads_learned_range), outputs up to 1.4
    assert _max_abs_diff(folder) <= 1e-4


def test_configs_of_the_fixtures():
    small, heads = read_diffusers_dir(SMALL), read_diffusers_dir(HEADS)
    assert (small.model.ch, small.model.ch_mult, small.model.attn_resolutions) == (8, (1, 2, 2), (8,))
    assert (small.model.num_heads, small.model.num_head_channels, small.model.dropout) == (1, -1, 0.1)
    assert (small.diffusion.schedule, small.diffusion.var_type, small.diffusion.mean_type) == \
        ("linear", "fixed_small", "eps")
    assert heads.model.learn_sigma and heads.model.num_head_channels == 2
    assert heads.model.attn_resolutions == (8, 4)
    assert (heads.diffusion.schedule, heads.diffusion.var_type, heads.diffusion.mean_type,
            heads.diffusion.loss_type) == ("cosine", "learned_range", "v", "hybrid")
    assert small.notes == () and heads.notes == ()


def test_old_attention_names_read_as_new(tmp_path):
    """Files saved before diffusers renamed the attention (query/key/value/proj_attn)."""
    from safetensors.numpy import save_file

    new = read_diffusers_dir(SMALL).tensors
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for name, value in new.items():
        for a, b in old_names.items():
            name = name.replace(a, b) if ".attentions." in name else name
        old[name] = value
    assert any(".proj_attn." in k for k in old)
    for f in ("config.json", "scheduler_config.json"):
        shutil.copy(os.path.join(SMALL, f), tmp_path / f)
    save_file(old, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    back = read_diffusers_dir(str(tmp_path)).tensors
    assert sorted(back) == sorted(new)
    assert all(np.array_equal(back[k], new[k]) for k in new)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    from safetensors.numpy import save_file

    shutil.copy(os.path.join(SMALL, "config.json"), tmp_path / "config.json")
    tensors = dict(read_diffusers_dir(SMALL).tensors)
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="only the safetensors format is read"):
        read_diffusers_dir(str(tmp_path))
    del tensors["conv_in.bias"]
    tensors["conv_out.weight"] = tensors["conv_out.weight"][:2]
    tensors["class_embedding.weight"] = np.zeros((10, 32), np.float32)
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConfigError) as info:
        read_diffusers_dir(str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: the weights do not fit")
    for part in ("1 tensor(s) missing (conv_in.bias)", "(class_embedding.weight)",
                 "conv_out.weight is [2, 8, 3, 3], expected [3, 8, 3, 3]"):
        assert part in message


def test_ddpm_cifar10_32_maps_tensor_for_tensor():
    cfg = model_config_from_diffusers(CIFAR10_32)
    reference = load_config(os.path.join(PRESETS, "ddpm_cifar10.yaml")).model
    assert cfg == dataclasses.replace(reference, dropout=0.0)  # the hub file has no dropout (0)
    with open(os.path.join(SMALL, "ddpm_cifar10_32_shapes.json"), encoding="utf-8") as f:
        diffusers = json.load(f)
    assert diffusers["params"] == CIFAR10_32_PARAMS
    want = {k: tuple(v) for k, v in diffusers["shapes"].items()}
    assert expected_shapes(cfg) == want
    # every variable of our network gets a tensor of the right shape (load_weights checks)
    unet = build_unet(cfg)
    assert unet.count_params() == CIFAR10_32_PARAMS
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s, dtype=np.float32) for k, s in want.items()}
    load_weights(unet, tensors)
    np.testing.assert_array_equal(unet.layers["out"].conv.kernel.numpy(),
                                  tensors["conv_out.weight"].transpose(2, 3, 1, 0))


REFUSED = [  # (field, value or "<absent>", what the message must also name)
    ("_class_name", "UNet2DConditionModel", "UNet2DModel"),
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
     "CrossAttnDownBlock2D"),
    ("down_block_types", ["DownBlock2D", "SkipDownBlock2D", "DownBlock2D", "DownBlock2D"], "AttnDownBlock2D"),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], "mirror"),
    ("act_fn", "gelu", "silu"),
    ("time_embedding_type", "fourier", "positional"),
    ("flip_sin_to_cos", True, "[sin, cos]"),
    ("flip_sin_to_cos", "<absent>", "[sin, cos]"),  # diffusers' default is true
    ("freq_shift", 0, "10000^"),
    ("downsample_padding", 1, "bottom and right"),
    ("norm_eps", 1e-5, "1e-06"),
    ("resnet_time_scale_shift", "scale_shift", "default"),
    ("class_embed_type", "timestep", "unconditional"),
    ("num_class_embeds", 10, "unconditional"),
    ("center_input_sample", True, "[-1, 1]"),
    ("mid_block_scale_factor", 2, "rescaled"),
    ("time_embedding_dim", 256, "512"),
    ("out_channels", 4, "learned_range"),
    ("attention_head_dim", 96, "divides"),
    ("cross_attention_dim", 768, "unknown"),
]


@pytest.mark.parametrize("field,value,also", REFUSED, ids=[f"{r[0]}={r[1]}" for r in REFUSED])
def test_refuses_configs_outside_the_ddpm_family(field, value, also):
    config = dict(CIFAR10_32)
    if value == "<absent>":
        del config[field]
    else:
        config[field] = value
    with pytest.raises(ConfigError) as info:
        model_config_from_diffusers(config, "DIR/config.json")
    message = str(info.value)
    assert message.startswith(f"DIR/config.json: {field}: ") and "\n" not in message
    assert also in message


SCHEDULER_REFUSED = [
    ("beta_schedule", "laplace", "squaredcos_cap_v2"),
    ("beta_end", 0.012, "0.02"),
    ("variance_type", "learned", "fixed_small"),
    ("variance_type", "learned_range", "out_channels 3"),
    ("prediction_type", "flow", "v_prediction"),
    ("trained_betas", [0.1] * 1000, "beta_schedule"),
    ("rescale_betas_zero_snr", True, "false"),
    ("_class_name", "EulerDiscreteScheduler", "DDPMScheduler"),
]


@pytest.mark.parametrize("field,value,also", SCHEDULER_REFUSED,
                         ids=[f"{r[0]}={str(r[1])[:12]}" for r in SCHEDULER_REFUSED])
def test_refuses_schedules_we_do_not_have(field, value, also):
    model = model_config_from_diffusers(CIFAR10_32)
    with pytest.raises(ConfigError) as info:
        diffusion_config_from_scheduler({field: value}, model, "DIR/scheduler_config.json")
    assert str(info.value).startswith(f"DIR/scheduler_config.json: {field}: ")
    assert also in str(info.value)


def _diffusers_betas(schedule: str, T: int, start: float, end: float) -> np.ndarray:
    """diffusers' DDPMScheduler betas (schedulers/scheduling_ddpm.py) in float64 numpy."""
    if schedule == "linear":
        return np.linspace(start, end, T)
    if schedule == "scaled_linear":
        return np.linspace(start ** 0.5, end ** 0.5, T) ** 2
    if schedule == "sigmoid":
        return 1.0 / (1.0 + np.exp(-np.linspace(-6, 6, T))) * (end - start) + start
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # squaredcos_cap_v2
    return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "sigmoid", "squaredcos_cap_v2"])
@pytest.mark.parametrize("T", [1000, 250])
def test_schedules_are_diffusers_betas(schedule, T):
    start, end = 1e-4 * 1000 / T, 0.02 * 1000 / T
    model = model_config_from_diffusers(CIFAR10_32)
    diffusion, notes = diffusion_config_from_scheduler(
        {"beta_schedule": schedule, "num_train_timesteps": T, "beta_start": start, "beta_end": end,
         "clip_sample": False}, model)
    np.testing.assert_allclose(make_betas(diffusion.schedule, diffusion.timesteps),
                               _diffusers_betas(schedule, T, start, end), rtol=1e-12)
    assert len(notes) == 1 and "clip_sample false" in notes[0]


def test_cli_import_then_sample(tmp_path, capsys):
    from ipu_diffusion import cli

    workdir = str(tmp_path / "run")
    assert cli.main(["import-diffusers", "--model-dir", SMALL, "--workdir", workdir,
                     "--set", "training.lr=1e-5", "--set", "diffusion.var_type=fixed_large"]) == 0
    assert "wrote" in capsys.readouterr().out
    cfg = load_config(os.path.join(workdir, "config.yaml"))
    assert cfg.model == read_diffusers_dir(SMALL).model
    assert (cfg.training.lr, cfg.diffusion.var_type) == (1e-5, "fixed_large")
    # the checkpoint at step 0 holds the imported weights as the model and as the EMA
    reference = build_unet(cfg.model)
    load_weights(reference, read_diffusers_dir(SMALL).tensors)
    reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints", "ckpt-0"))
    for i, v in enumerate(reference.trainable_variables):
        np.testing.assert_array_equal(reader.get_tensor(f"ema/shadow/{i}/.ATTRIBUTES/VARIABLE_VALUE"),
                                      v.numpy())
    out = str(tmp_path / "grid")
    assert cli.main(["sample", "--workdir", workdir, "--num", "2", "--steps", "2", "--out", out]) == 0
    assert np.load(out + ".npz")["images"].shape == (2, 16, 16, 3)
    # a second import into the same run directory is refused
    assert cli.main(["import-diffusers", "--model-dir", SMALL, "--workdir", workdir]) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("argv,prefix", [
    (["--set", "model.ch=16"], "--set model.ch: "),
    (["--set", "diffusion.schedule=cosine"], "--set diffusion.schedule: "),
    (["--set", "diffusion.var_type=learned_range"], "model.learn_sigma: "),  # config validation
])
def test_cli_refuses_changing_the_network(tmp_path, capsys, argv, prefix):
    from ipu_diffusion import cli

    workdir = tmp_path / "run"
    assert cli.main(["import-diffusers", "--model-dir", SMALL, "--workdir", str(workdir)] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + prefix)
    assert not workdir.exists()  # checked before anything is written


def test_cli_refusal_is_one_error_line(tmp_path, capsys):
    from ipu_diffusion import cli

    for f in ("diffusion_pytorch_model.safetensors", "scheduler_config.json"):
        shutil.copy(os.path.join(SMALL, f), tmp_path / f)
    with open(os.path.join(SMALL, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["act_fn"] = "mish"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert cli.main(["import-diffusers", "--model-dir", str(tmp_path), "--workdir",
                     str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'error: {tmp_path / "config.json"}: act_fn: "mish" is not supported; supported: '
                   '"silu" or "swish" (swish throughout)']
