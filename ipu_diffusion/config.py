"""Run configuration: frozen dataclasses, the one place where defaults are written.

A run config is a YAML file with the sections ``run``, ``model``, ``diffusion``,
``pipeline``, ``ipu``, ``training``, ``data`` and ``eval``. Loading is strict: an
unknown key, a value of the wrong type or a choice outside its ``Literal`` raises one
:class:`ConfigError` that names the key path, the bad value and what is allowed.

    cfg = load_config("pipeline_configs/digits.yaml", overrides=["training.steps=100"])
"""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

if sys.version_info >= (3, 8):
    from typing import Literal, get_args, get_origin
else:  # pragma: no cover
    raise RuntimeError("ipu_diffusion needs Python 3.8 or newer")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key path."""


class ConfigWarning(UserWarning):
    """A key that is read but has no effect (removed, or unused in this combination)."""


# --------------------------------------------------------------------------- choices
# The one list of each choice: the Literal annotations below, the diffusion modules and
# the command line all read these (``Literal[("a", "b")]`` is ``Literal["a", "b"]``).

SCHEDULES: Tuple[str, ...] = ("linear", "cosine", "quadratic", "sigmoid")  # beta schedules
MEAN_TYPES: Tuple[str, ...] = ("eps", "x0", "v")  # what the network predicts
VAR_TYPES: Tuple[str, ...] = ("fixed_small", "fixed_large", "learned_range")
LOSS_TYPES: Tuple[str, ...] = ("mse", "l1", "hybrid", "kl")
TIMESTEP_SAMPLERS: Tuple[str, ...] = ("uniform", "loss_aware")
SAMPLERS: Tuple[str, ...] = ("ddpm", "ddim", "dpm_solver")  # image samplers (eval, sample)
SAMPLING_PRECISIONS: Tuple[str, ...] = ("float32", "bfloat16")  # the network's, when sampling
PIPELINE_SCHEDULES: Tuple[str, ...] = ("grouped", "interleaved", "sequential")


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RunSection:
    name: str = "run"
    seed: int = 0
    workdir: str = ""  # empty: runs/<name>


@dataclass(frozen=True)
class ModelConfig:
    """U-Net hyperparameters (Ho et al. 2020, appendix B; Nichol & Dhariwal 2021)."""

    image_size: int = 32
    in_channels: int = 3
    ch: int = 128  # base channel count; the timestep embedding is 4 * ch wide
    ch_mult: Tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Tuple[int, ...] = (16,)
    num_heads: int = 1
    num_head_channels: int = -1  # > 0 overrides num_heads: heads = channels // this
    dropout: float = 0.1
    resamp_with_conv: bool = True
    resblock_updown: bool = False
    use_scale_shift_norm: bool = False
    learn_sigma: bool = False  # output 2 * in_channels (eps and the variance interpolant)
    num_classes: int = 0  # 0 = unconditional; else labels 0..n-1 plus a null label n
    num_groups: int = 32


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: Literal[SCHEDULES] = "linear"
    timesteps: int = 1000
    mean_type: Literal[MEAN_TYPES] = "eps"
    var_type: Literal[VAR_TYPES] = "fixed_large"
    loss_type: Literal[LOSS_TYPES] = "mse"
    hybrid_lambda: float = 0.001
    min_snr_gamma: float = 0.0  # 0 = off; else min-SNR-gamma weighting (Hang et al. 2023)
    timestep_sampler: Literal[TIMESTEP_SAMPLERS] = "uniform"


@dataclass(frozen=True)
class PipelineConfig:
    """How the U-Net's blocks become stages (see ipu_diffusion/pipeline).

    Give at most one of ``cuts`` (names of the blocks that start stages 1..S-1) and
    ``blocks_per_stage``; with neither and ``stages > 1`` the stages are balanced
    automatically by estimated FLOPs.
    """

    stages: int = 1
    cuts: Tuple[str, ...] = ()
    blocks_per_stage: Tuple[int, ...] = ()
    microbatches: int = 1  # M: gradient accumulation steps per replica
    schedule: Literal[PIPELINE_SCHEDULES] = "grouped"
    recompute: bool = False
    device_mapping: Tuple[int, ...] = ()  # stage s -> device; empty = 0..S-1
    device_type: Literal["auto", "cpu", "gpu"] = "auto"
    # Fallback only: with schedule grouped, recompute off and every stage on a CPU of this
    # host, each stage runs its M microbatches as one batch (the same update; see fallback.py)
    fuse_microbatches: bool = True


@dataclass(frozen=True)
class IPUSection:
    """Options only the Poplar backend reads (ipu_diffusion/pipeline/ipu_plan.py)."""

    replicas: int = 1
    steps_per_execution: int = 0  # 0 = choose: the smallest multiple of M >= 2 * S
    recomputation_mode: Literal[
        "auto", "recompute_then_backpropagate", "recompute_and_backpropagate_interleaved"
    ] = "auto"
    available_memory_proportion: Tuple[float, ...] = ()  # per stage; empty = SDK default
    ipu_model: bool = False  # IPUModel emulator instead of hardware
    tiles_per_ipu: int = 0  # emulator only; 0 = a full Mk2 IPU (1472)
    ipu_version: Literal["ipu2", "ipu21"] = "ipu2"
    partials_type: Literal["float", "half"] = "float"
    offload_optimizer_state: bool = False


@dataclass(frozen=True)
class TrainingConfig:
    steps: int = 800_000
    batch_size: int = 128  # global batch: micro-batch * microbatches * replicas
    lr: float = 2e-4
    warmup_steps: int = 5000
    lr_decay: Literal["none", "cosine"] = "none"  # cosine: to 0 at training.steps
    grad_clip: float = 1.0  # clip by global norm; 0 = off
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    ema_decay: float = 0.9999
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16"] = "float32"
    jit_compile: bool = False
    steps_per_execution: int = 1
    strategy: Literal["default", "mirrored", "multi_worker"] = "default"
    num_replicas: int = 0  # mirrored on CPU: logical CPU devices; 0 = all GPUs / 1 CPU
    worker_timeout_s: float = 120.0  # multi_worker: how long to wait for every worker to join
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 0  # 0 = only at the end
    num_sample_images: int = 64  # per sample grid; 0 = no sample grids
    deterministic: bool = False  # tf.config.experimental.enable_op_determinism
    max_nonfinite_steps: int = 10  # stop after this many consecutive non-finite steps
    class_dropout: float = 0.1  # label -> null probability (classifier-free guidance)


@dataclass(frozen=True)
class DataConfig:
    """Where images come from; they are resized to model.image_size with
    model.in_channels channels."""

    source: Literal["digits", "folder", "npz", "tfds"] = "digits"
    path: str = ""  # folder or .npz file, or the TFDS data_dir
    tfds_name: str = ""
    random_flip: bool = False
    test_fraction: float = 0.2  # digits: held-out split kept for evaluation
    use_labels: bool = False


@dataclass(frozen=True)
class EvalSection:
    sampler: Literal[SAMPLERS] = "ddim"
    steps: int = 50
    eta: float = 0.0
    # bfloat16: the sampling network computes in bfloat16 (weights kept in float32, the
    # sampler's own arithmetic in float32); faster on CPUs with AVX512-BF16 or AMX, and
    # no longer the float32 samples bit for bit
    precision: Literal[SAMPLING_PRECISIONS] = "float32"
    num_samples: int = 1000
    batch_size: int = 250
    # the sampling network's batch is cut into this many parts, called as independent
    # branches of one graph, which TensorFlow runs concurrently (1 = one call of the whole
    # batch); on 2 CPU cores 2 parts sampled 1.20x as fast as one call at batch 250
    # (benchmarks/sampling.py parts); samples equal one call's to float32 round-off, not bit
    # for bit
    parallel_calls: int = 2
    inception_path: str = ""  # frozen FID Inception graph (.pb); or $IPU_DIFFUSION_INCEPTION
    at_end: bool = True


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    ipu: IPUSection = field(default_factory=IPUSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalSection = field(default_factory=EvalSection)

    @property
    def workdir(self) -> str:
        return self.run.workdir or os.path.join("runs", self.run.name)


# --------------------------------------------------------------------------- strict loading


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (tuple, Tuple):
        return "a list of " + _type_name(get_args(tp)[0])
    if origin is Union:
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ConfigError(f"{path}: {value!r} is not allowed; choose {_type_name(tp)}")
        return value
    if origin in (tuple, Tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        item_tp = get_args(tp)[0]
        return tuple(_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")  # programming error


def _build(cls: Any, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {data!r}")
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in hints:
            raise ConfigError(f"{key_path}: unknown key; valid keys here: {', '.join(known)}")
        kwargs[key] = _convert(value, hints[key], key_path)
    return cls(**kwargs)


_HINTS: Dict[Any, Dict[str, Any]] = {}


def _hints(cls: Any) -> Dict[str, Any]:
    if cls not in _HINTS:
        import typing

        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _set_path(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> Tuple[str, Any]:
    """``"training.lr=1e-3"`` -> ``("training.lr", 0.001)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip(), value


def config_from_dict(data: Dict[str, Any], overrides: Sequence[str] = (),
                     source: str = "") -> RunConfig:
    """Build a validated :class:`RunConfig` from a plain dict and ``a.b=c`` overrides.

    A removed key (:data:`REMOVED_KEYS`) is dropped; it and each key that has no effect
    in this combination (:func:`ineffective_keys`) give a :class:`ConfigWarning` naming
    the key (and ``source``, the file, when given)."""
    tree = _deep_copy(data or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    notes = _drop_removed(tree)
    cfg = _build(RunConfig, tree, "")
    validate(cfg)
    for message in notes + ineffective_keys(cfg):
        warnings.warn(f"{source}: {message}" if source else message, ConfigWarning, stacklevel=2)
    return cfg


def _read_yaml(path: str) -> Any:
    """The YAML document in ``path``; ConfigError for a file that cannot be read, is not
    UTF-8 text, is not YAML or holds nothing (empty or only comments)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start} is 0x{e.object[e.start]:02x}); "
                          "a run config is a YAML text file, see pipeline_configs/") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None or data == {}:
        raise ConfigError(f"{path}: the file holds no settings (it is empty or only comments); "
                          "every default would apply (the 35.7M-parameter CIFAR-10 U-Net for "
                          "800,000 steps). Start from a file in pipeline_configs/")
    return data


def _read_tree(path: str, seen: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """The YAML mapping in ``path``, with ``base: other.yaml`` (relative to the file)
    merged underneath: keys in this file override the base's, section by section."""
    if os.path.isfile(path) and os.path.realpath(path) in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    merged = _read_tree(os.path.join(os.path.dirname(path), base), seen + (os.path.realpath(path),))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def load_config(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a YAML run config strictly (``yaml.safe_load`` only; ``base:`` inherits).
    Errors and warnings name the file."""
    data = _read_tree(path)
    try:
        return config_from_dict(data, overrides, source=path)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain nested dict (tuples as lists), suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config; ``load_config`` reads it back to an equal config."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


# --------------------------------------------------------------------------- cross-checks


def _positive(value: float, path: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path}: {value!r} must be {bound}")


def validate(cfg: RunConfig) -> None:
    """Checks that involve more than one key; each raises one ConfigError."""
    m, d, p, t, data = cfg.model, cfg.diffusion, cfg.pipeline, cfg.training, cfg.data
    for path, value in [
        ("model.image_size", m.image_size), ("model.in_channels", m.in_channels),
        ("model.ch", m.ch), ("model.num_groups", m.num_groups),
        ("diffusion.timesteps", d.timesteps), ("training.steps", t.steps),
        ("training.batch_size", t.batch_size), ("training.lr", t.lr),
        ("training.log_every", t.log_every), ("training.checkpoint_every", t.checkpoint_every),
        ("training.keep_checkpoints", t.keep_checkpoints),
        ("training.steps_per_execution", t.steps_per_execution),
        ("training.max_nonfinite_steps", t.max_nonfinite_steps),
        ("training.worker_timeout_s", t.worker_timeout_s),
        ("eval.steps", cfg.eval.steps), ("eval.batch_size", cfg.eval.batch_size),
        ("eval.parallel_calls", cfg.eval.parallel_calls), ("ipu.replicas", cfg.ipu.replicas),
    ]:
        _positive(value, path)
    for path, value in [
        ("model.num_res_blocks", m.num_res_blocks), ("model.num_classes", m.num_classes),
        ("training.warmup_steps", t.warmup_steps), ("training.grad_clip", t.grad_clip),
        ("training.sample_every", t.sample_every), ("training.num_replicas", t.num_replicas),
        ("training.num_sample_images", t.num_sample_images),
        ("eval.num_samples", cfg.eval.num_samples), ("diffusion.min_snr_gamma", d.min_snr_gamma),
        ("ipu.steps_per_execution", cfg.ipu.steps_per_execution),
    ]:
        _positive(value, path, allow_zero=True)
    if not m.ch_mult or any(c <= 0 for c in m.ch_mult):
        raise ConfigError(f"model.ch_mult: {list(m.ch_mult)!r} must be a non-empty list of positive integers")
    for path, value in [("model.dropout", m.dropout), ("training.ema_decay", t.ema_decay),
                        ("training.class_dropout", t.class_dropout),
                        ("data.test_fraction", data.test_fraction)]:
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{path}: {value!r} must be in [0, 1)")
    if (d.var_type == "learned_range") != m.learn_sigma:
        raise ConfigError(
            f"model.learn_sigma: {m.learn_sigma!r} does not match diffusion.var_type "
            f"{d.var_type!r}; learn_sigma must be true exactly when var_type is 'learned_range'")
    if d.loss_type == "hybrid" and d.var_type != "learned_range":
        raise ConfigError("diffusion.loss_type: 'hybrid' trains the variance and needs "
                          "diffusion.var_type 'learned_range'")
    if data.use_labels and m.num_classes == 0:
        raise ConfigError("data.use_labels: true needs model.num_classes > 0")
    _validate_run_name(cfg.run.name)
    _validate_pipeline(cfg)


def _validate_run_name(name: str) -> None:
    """``run.name`` becomes the directory ``runs/<run.name>`` when no workdir is given, so
    it must be one plain path component: never empty, ``.``, ``..``, absolute or holding
    a separator (``../x`` or ``/etc`` would write outside ``runs/``)."""
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if (name.strip() in ("", ".", "..") or any(c in name for c in separators)
            or any(ord(c) < 32 for c in name)):
        raise ConfigError(f"run.name: {name!r} must be a plain directory name (no '/', '\\', "
                          "control characters, '.' or '..'); it names runs/<run.name>. To train "
                          "elsewhere set run.workdir or pass --workdir")


def _validate_pipeline(cfg: RunConfig) -> None:
    p, t = cfg.pipeline, cfg.training
    validate_pipeline(p)
    if t.batch_size % p.microbatches:
        raise ConfigError(f"training.batch_size: {t.batch_size} is not divisible by "
                          f"pipeline.microbatches {p.microbatches}")
    if cfg.ipu.available_memory_proportion and len(cfg.ipu.available_memory_proportion) != p.stages:
        raise ConfigError(f"ipu.available_memory_proportion: needs one value per stage "
                          f"({p.stages}), got {list(cfg.ipu.available_memory_proportion)}")


def validate_pipeline(p: PipelineConfig) -> None:
    """The checks of a pipeline section that need no model (the one place they are
    written; ``pipeline/partition.py`` adds those that need the block list)."""
    _positive(p.stages, "pipeline.stages")
    _positive(p.microbatches, "pipeline.microbatches")
    if p.cuts and p.blocks_per_stage:
        raise ConfigError("pipeline: give either cuts or blocks_per_stage, not both")
    if p.cuts and len(p.cuts) != p.stages - 1:
        raise ConfigError(f"pipeline.cuts: {len(p.cuts)} cut(s) make {len(p.cuts) + 1} stages "
                          f"but pipeline.stages is {p.stages}")
    if p.blocks_per_stage:
        if len(p.blocks_per_stage) != p.stages:
            raise ConfigError(f"pipeline.blocks_per_stage: {list(p.blocks_per_stage)} has "
                              f"{len(p.blocks_per_stage)} entries but pipeline.stages is {p.stages}")
        if any(n <= 0 for n in p.blocks_per_stage):
            raise ConfigError(f"pipeline.blocks_per_stage: {list(p.blocks_per_stage)} has an "
                              "empty stage; every stage needs at least one block")
    if p.device_mapping:
        if len(p.device_mapping) != p.stages:
            raise ConfigError(f"pipeline.device_mapping: {list(p.device_mapping)} has "
                              f"{len(p.device_mapping)} entries but pipeline.stages is {p.stages}")
        if any(d < 0 for d in p.device_mapping):
            raise ConfigError(f"pipeline.device_mapping: {list(p.device_mapping)} has a negative device")


# --------------------------------------------------------------------------- keys without effect

#: Keys that were removed: a config (an old run's config.yaml) that still holds one loads,
#: with a ConfigWarning, and the key is dropped. Key path -> why it has no effect.
REMOVED_KEYS: Dict[str, str] = {
    "data.shuffle_buffer": "the data order is a pure function of run.seed and the step",
}

#: Keys read only in some combinations: (key path, whether this config reads it, when it
#: is read). A key set away from its default where it is not read gives a ConfigWarning.
_READ_ONLY_WITH = (
    ("diffusion.min_snr_gamma", lambda c: c.diffusion.loss_type != "kl",
     "diffusion.loss_type 'mse', 'l1' or 'hybrid' (it weights their mean-error term)"),
    ("diffusion.hybrid_lambda", lambda c: c.diffusion.loss_type == "hybrid",
     "diffusion.loss_type 'hybrid'"),
    ("training.class_dropout", lambda c: c.data.use_labels, "data.use_labels: true"),
    ("training.num_replicas", lambda c: c.training.strategy == "mirrored",
     "training.strategy 'mirrored'"),
    ("training.worker_timeout_s", lambda c: c.training.strategy == "multi_worker",
     "training.strategy 'multi_worker'"),
    ("training.sample_every", lambda c: c.training.num_sample_images > 0,
     "training.num_sample_images > 0"),
    ("eval.eta", lambda c: c.eval.sampler == "ddim", "eval.sampler 'ddim'"),
    ("data.path", lambda c: c.data.source != "digits", "data.source 'folder', 'npz' or 'tfds'"),
    ("data.tfds_name", lambda c: c.data.source == "tfds", "data.source 'tfds'"),
    ("data.test_fraction", lambda c: c.data.source == "digits", "data.source 'digits'"),
)


def _drop_removed(tree: Dict[str, Any]) -> List[str]:
    """Delete the :data:`REMOVED_KEYS` from a raw config tree; one message for each."""
    notes = []
    for dotted, why in REMOVED_KEYS.items():
        section, key = dotted.split(".")
        values = tree.get(section)
        if isinstance(values, dict) and key in values:
            del values[key]
            notes.append(f"{dotted}: removed and ignored, it has no effect ({why}); "
                         "delete it from the config")
    return notes


def _get(cfg: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        cfg = getattr(cfg, key)
    return cfg


def ineffective_keys(cfg: RunConfig) -> List[str]:
    """One message for each key set away from its default where ``cfg`` never reads it."""
    defaults = RunConfig()
    return [f"{key}: {_get(cfg, key)!r} has no effect here; it is read only with {when}"
            for key, read, when in _READ_ONLY_WITH
            if not read(cfg) and _get(cfg, key) != _get(defaults, key)]


# --------------------------------------------------------------------------- resume

#: The keys a resumed run may change (``train --resume`` with a new --config or --set):
#: how long training runs and its learning-rate schedule (a function of the step only,
#: no checkpointed state; lr_decay cosine ends at training.steps, and lowering
#: training.lr is the advice after a non-finite stop), what it logs, checkpoints, samples
#: and evaluates, and how the same update is executed (``pipeline.*``: the pipelined
#: update equals the unsplit one, and the checkpoint holds the same variables). Every
#: other key defines what is trained or the data and is refused. ``section.*`` = a
#: whole section.
RESUME_SAFE: Tuple[str, ...] = (
    "run.name", "run.workdir",
    "training.steps", "training.lr", "training.warmup_steps", "training.lr_decay",
    "training.log_every", "training.checkpoint_every", "training.keep_checkpoints",
    "training.sample_every", "training.num_sample_images", "training.max_nonfinite_steps",
    "training.worker_timeout_s", "training.steps_per_execution", "training.jit_compile",
    "training.deterministic",
    "eval.*", "pipeline.*",
)


def _flat(cfg: RunConfig) -> Dict[str, Any]:
    return {f"{section}.{key}": value for section, values in to_dict(cfg).items()
            for key, value in values.items()}


def resume_conflicts(saved: RunConfig, new: RunConfig) -> List[Tuple[str, Any, Any]]:
    """``(key path, saved value, new value)`` for each key outside :data:`RESUME_SAFE`
    that differs between a run's saved config and the one it is resumed with."""
    old, now = _flat(saved), _flat(new)
    return [(key, old[key], now[key]) for key in old
            if old[key] != now[key] and key not in RESUME_SAFE
            and key.split(".")[0] + ".*" not in RESUME_SAFE]
