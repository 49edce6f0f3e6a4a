"""Keys that do nothing (removed keys, keys unused in the chosen combination) warn; the
allowed choices are written once; what may change when a run is resumed."""
import glob
import os
import typing
import warnings

import pytest
import yaml

from ipu_diffusion import config as config_module
from ipu_diffusion.config import (ConfigWarning, DataConfig, config_from_dict, load_config,
                                  resume_conflicts, save_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "pipeline_configs", "*.yaml")))


def _config_warnings(fn, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = fn(*args)
    return cfg, [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]


# ----------------------------------------------------------------- removed keys


def test_shuffle_buffer_is_gone_and_an_old_config_still_loads_with_a_warning(tmp_path):
    assert "shuffle_buffer" not in {f.name for f in DataConfig.__dataclass_fields__.values()}
    old = {"run": {"name": "old"}, "data": {"source": "digits", "shuffle_buffer": 10000}}
    path = tmp_path / "config.yaml"  # as an old run's workdir holds it
    path.write_text(yaml.safe_dump(old), encoding="utf-8")
    cfg, messages = _config_warnings(load_config, str(path))
    assert cfg == config_from_dict({"run": {"name": "old"}})
    assert len(messages) == 1 and messages[0].startswith(f"{path}: data.shuffle_buffer: ")
    assert "no effect" in messages[0]
    save_config(cfg, str(path))  # the resolved config written back has no such key
    assert "shuffle_buffer" not in path.read_text(encoding="utf-8")


def test_shipped_configs_do_not_hold_removed_keys():
    for path in SHIPPED:
        text = open(path, encoding="utf-8").read()
        for dotted in config_module.REMOVED_KEYS:
            assert dotted.split(".")[1] not in text, f"{path} holds {dotted}"


# ----------------------------------------------------------------- keys without effect

# (overrides, the key that has no effect with them): each from the code that reads it
# (diffusion/losses.py, training/run.py, inference/generate.py, data/dataset.py).
NO_EFFECT = [
    (["diffusion.loss_type=kl", "diffusion.min_snr_gamma=5.0"], "diffusion.min_snr_gamma"),
    (["diffusion.hybrid_lambda=0.01"], "diffusion.hybrid_lambda"),
    (["training.class_dropout=0.2"], "training.class_dropout"),
    (["training.num_replicas=2"], "training.num_replicas"),
    (["training.strategy=multi_worker", "training.num_replicas=2"], "training.num_replicas"),
    (["training.worker_timeout_s=30"], "training.worker_timeout_s"),
    (["training.num_sample_images=0", "training.sample_every=100"], "training.sample_every"),
    (["eval.sampler=ddpm", "eval.eta=1.0"], "eval.eta"),
    (["eval.sampler=dpm_solver", "eval.eta=0.5"], "eval.eta"),
    (["data.path=/data/x.npz"], "data.path"),
    (["data.tfds_name=cifar10"], "data.tfds_name"),
    (["data.source=npz", "data.path=x.npz", "data.test_fraction=0.1"], "data.test_fraction"),
]

# The same keys where they are read, or left at their defaults: no warning.
READ = [
    ["diffusion.min_snr_gamma=5.0"],
    ["diffusion.loss_type=hybrid", "diffusion.var_type=learned_range", "model.learn_sigma=true",
     "diffusion.hybrid_lambda=0.01", "diffusion.min_snr_gamma=5.0"],
    ["diffusion.loss_type=kl", "diffusion.hybrid_lambda=0.001", "diffusion.min_snr_gamma=0"],
    ["data.use_labels=true", "model.num_classes=10", "training.class_dropout=0.2"],
    ["training.strategy=mirrored", "training.num_replicas=2"],
    ["training.strategy=multi_worker", "training.worker_timeout_s=30"],
    ["training.sample_every=100"],
    ["eval.sampler=ddim", "eval.eta=1.0"],
    ["data.source=tfds", "data.tfds_name=cifar10", "data.path=/tfds"],
    ["data.source=folder", "data.path=/images"],
    ["data.test_fraction=0.1"],
]


@pytest.mark.parametrize("overrides, key", NO_EFFECT)
def test_key_without_effect_warns_naming_it(overrides, key):
    _, messages = _config_warnings(config_from_dict, {}, overrides)
    assert len(messages) == 1 and messages[0].startswith(f"{key}: ") and "no effect" in messages[0]


@pytest.mark.parametrize("overrides", READ)
def test_key_that_is_read_does_not_warn(overrides):
    assert _config_warnings(config_from_dict, {}, overrides)[1] == []


def test_warning_from_a_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("diffusion: {loss_type: kl, min_snr_gamma: 5.0}\n", encoding="utf-8")
    _, messages = _config_warnings(load_config, str(path))
    assert messages == [f"{path}: diffusion.min_snr_gamma: 5.0 has no effect here; it is read "
                        "only with diffusion.loss_type 'mse', 'l1' or 'hybrid' (it weights "
                        "their mean-error term)"]


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_configs_load_without_warnings(path):
    assert _config_warnings(load_config, path)[1] == []


# ----------------------------------------------------------------- choices: one list each

# The names, written out here from the papers and the modules' docstrings.
CHOICES = {
    ("diffusion", "schedule"): ("linear", "cosine", "quadratic", "sigmoid"),
    ("diffusion", "mean_type"): ("eps", "x0", "v"),
    ("diffusion", "var_type"): ("fixed_small", "fixed_large", "learned_range"),
    ("diffusion", "loss_type"): ("mse", "l1", "hybrid", "kl"),
    ("diffusion", "timestep_sampler"): ("uniform", "loss_aware"),
    ("eval", "sampler"): ("ddpm", "ddim", "dpm_solver"),
    ("pipeline", "schedule"): ("grouped", "interleaved", "sequential"),
}


@pytest.mark.parametrize("section, key", CHOICES)
def test_literal_choices_are_the_expected_names(section, key):
    cls = type(getattr(config_module.RunConfig(), section))
    assert typing.get_args(typing.get_type_hints(cls)[key]) == CHOICES[section, key]


def test_modules_and_cli_use_the_config_lists():
    from ipu_diffusion import cli
    from ipu_diffusion.diffusion import gaussian, sampling, schedules, timestep_sampler
    from ipu_diffusion.pipeline import memory, schedule

    assert schedules.SCHEDULES is config_module.SCHEDULES
    assert sampling.SAMPLERS is config_module.SAMPLERS
    assert memory.SCHEDULES is schedule.SCHEDULES is config_module.PIPELINE_SCHEDULES
    for module, name in [(gaussian, "MEAN_TYPES"), (gaussian, "VAR_TYPES"),
                         (gaussian, "LOSS_TYPES"), (timestep_sampler, "TIMESTEP_SAMPLERS")]:
        assert getattr(module, name) is getattr(config_module, name), name
    for command in ["sample", "eval"]:
        sub = cli._parser()._subparsers._group_actions[0].choices[command]
        sampler = next(a for a in sub._actions if a.dest == "sampler")
        assert sampler.choices is config_module.SAMPLERS


# ----------------------------------------------------------------- resume

# Keys that change what is trained or on what: each refused on resume.
REFUSED = [
    ("diffusion.schedule", "cosine"), ("diffusion.timesteps", 500), ("diffusion.mean_type", "v"),
    ("diffusion.loss_type", "l1"), ("diffusion.hybrid_lambda", 0.01),
    ("diffusion.min_snr_gamma", 5.0), ("diffusion.timestep_sampler", "loss_aware"),
    ("model.image_size", 16), ("model.in_channels", 3), ("model.ch", 16),
    ("data.source", "npz"), ("data.path", "x.npz"), ("data.random_flip", True),
    ("data.test_fraction", 0.1), ("training.batch_size", 16),
    ("training.precision", "mixed_bfloat16"), ("training.ema_decay", 0.99),
    ("training.grad_clip", 0.5), ("training.class_dropout", 0.2), ("run.seed", 7),
    ("training.strategy", "mirrored"), ("ipu.replicas", 2),
]
# Keys a resumed run may change.
ALLOWED = [
    ("training.steps", 100), ("training.lr", 1e-4), ("training.warmup_steps", 0),
    ("training.lr_decay", "cosine"), ("training.log_every", 1), ("training.checkpoint_every", 2),
    ("training.keep_checkpoints", 1), ("training.sample_every", 5),
    ("training.num_sample_images", 0), ("training.max_nonfinite_steps", 3),
    ("training.worker_timeout_s", 10.0), ("training.steps_per_execution", 2),
    ("training.jit_compile", True), ("training.deterministic", False), ("eval.sampler", "ddpm"),
    ("eval.steps", 7), ("eval.num_samples", 0), ("eval.at_end", True), ("run.name", "other"),
    ("run.workdir", "/elsewhere"), ("pipeline.stages", 2), ("pipeline.microbatches", 2),
    ("pipeline.recompute", True),
]
BASE = {"model": {"image_size": 8, "in_channels": 1, "ch": 8, "ch_mult": [1], "num_groups": 4,
                  "attn_resolutions": []},
        "diffusion": {"loss_type": "mse", "timesteps": 50},
        "training": {"batch_size": 8, "steps": 6, "deterministic": True},
        "eval": {"at_end": False}}


def _quiet(overrides=()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return config_from_dict(BASE, list(overrides))


@pytest.mark.parametrize("key, value", REFUSED)
def test_resume_conflict_names_key_and_both_values(key, value):
    saved = _quiet()
    new = _quiet([f"{key}={value}"])
    section, name = key.split(".")
    assert resume_conflicts(saved, new) == [(key, getattr(getattr(saved, section), name), value)]


@pytest.mark.parametrize("key, value", ALLOWED)
def test_resume_may_change_schedule_length_logging_eval_and_execution(key, value):
    assert resume_conflicts(_quiet(), _quiet([f"{key}={value}"])) == []


def test_resume_conflicts_list_every_differing_key():
    new = _quiet(["diffusion.var_type=learned_range", "model.learn_sigma=true",
                  "data.use_labels=true", "model.num_classes=10", "training.steps=9"])
    assert resume_conflicts(_quiet(), new) == [
        ("model.learn_sigma", False, True), ("model.num_classes", 0, 10),
        ("diffusion.var_type", "fixed_large", "learned_range"), ("data.use_labels", False, True)]


def test_readme_lists_what_may_change_on_resume():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index("### What may change on resume")
    section = text[start:text.index("\n#", start + 1)]
    for key in config_module.RESUME_SAFE:
        assert f"`{key}`" in section, key
