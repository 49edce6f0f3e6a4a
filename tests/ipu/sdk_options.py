"""Stand-ins for the Poplar SDK's option checks, each ported from the SDK 3.4 sources
(graphcore/keras and graphcore/tensorflow, branches ``r2.6/sdk-release-3.4``): what
``set_pipelining_options`` / ``set_gradient_accumulation_options`` accept, ``IPUConfig``'s
strict attributes and types, ``fit``'s step arithmetic, the pipeline-depth rule and
``compile``'s loss-scale wrap. A value the SDK rejects raises here with the SDK's words.
"""
from __future__ import annotations

import enum
from types import SimpleNamespace
from typing import Any, Dict, Mapping

# --------------------------------------------------------------------------- pipelining


class PipelineSchedule(enum.Enum):
    """tensorflow/python/ipu/ops/pipelining_ops.py"""
    Grouped = 0
    Interleaved = 1
    Sequential = 2


class RecomputationMode(enum.Enum):
    """tensorflow/python/ipu/ops/pipelining_ops.py"""
    Auto = 0
    RecomputeThenBackpropagate = 1
    RecomputeAndBackpropagateInterleaved = 2


class GradientAccumulationReductionMethod(enum.Enum):
    """tensorflow/python/ipu/gradient_accumulation.py"""
    SUM = 0
    MEAN = 1
    RUNNING_MEAN = 2


class PipelineStageOptions:
    """tensorflow/python/ipu/ops/pipelining_ops.py: ``__init__(self, convolution_options=None,
    matmul_options=None, slice_options=None)``, all dicts."""

    def __init__(self, convolution_options=None, matmul_options=None, slice_options=None):
        for name, value in (("convolution_options", convolution_options),
                            ("matmul_options", matmul_options), ("slice_options", slice_options)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name} must be a dictionary of Poplar option strings")
        self.convolution_options = convolution_options or {}
        self.matmul_options = matmul_options or {}


# keyword arguments of tensorflow/python/ipu/ops/pipelining_ops.py ``pipeline`` that Keras
# forwards from set_pipelining_options(**pipelining_kwargs)
PIPELINE_KWARGS = {
    "gradient_accumulation_dtype", "gradient_accumulation_for_captured_grads",
    "pipeline_schedule", "recomputation_mode", "forward_propagation_stages_poplar_options",
    "backward_propagation_stages_poplar_options", "weight_update_poplar_options",
    "offload_weight_update_variables", "replicated_optimizer_state_sharding",
    "offload_activations", "offload_gradient_accumulation_buffers", "replicated_weight_sharding",
    "offload_weights", "continuous_weight_updates", "accumulate_outfeed_dtype", "name"}
# keras/ipu/extensions/extensions_base.py ``_set_pipelining_options_impl`` rejects these
PIPELINE_REJECTED = {
    "gradient_accumulation_count", "computational_stages", "repeat_count", "inputs",
    "infeed_queue", "outfeed_queue", "optimizer_function", "outfeed_loss", "outfeed_mask",
    "batch_serialization_iterations", "experimental_normalize_gradients"}
# GradientAccumulationOptimizerV2's keyword arguments (tensorflow/python/ipu/optimizers/
# gradient_accumulation_optimizer.py) that set_gradient_accumulation_options forwards
ACCUMULATION_KWARGS = {"offload_weight_update_variables", "replicated_optimizer_state_sharding",
                       "dtype", "name"}


def _reduction(value) -> GradientAccumulationReductionMethod:
    """``GradientAccumulationReductionMethod.parse``: a member or 'sum'/'mean'/'running_mean'."""
    if isinstance(value, GradientAccumulationReductionMethod):
        return value
    if isinstance(value, str) and value.upper() in GradientAccumulationReductionMethod.__members__:
        return GradientAccumulationReductionMethod[value.upper()]
    raise ValueError(f"Cannot parse {value!r} as a GradientAccumulationReductionMethod")


def _steps(value) -> int:
    # extensions_base.py: "Expected `gradient_accumulation_steps_per_replica` to be a
    # positive integer"
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `gradient_accumulation_steps_per_replica` to be a positive "
                         f"integer, but got {value} instead.")
    return value


def check_pipelining_options(options: Mapping[str, Any], num_stages: int) -> Dict[str, Any]:
    """``FunctionalExtension.set_pipelining_options(gradient_accumulation_steps_per_replica=None,
    device_mapping=None, accumulate_outfeed=None, gradient_accumulation_reduction_method='sum',
    **pipelining_kwargs)`` (functional_extensions.py) and what ``pipelining_ops.pipeline``
    checks of the forwarded values."""
    opts = dict(options)
    explicit = {"gradient_accumulation_steps_per_replica", "device_mapping", "accumulate_outfeed",
                "gradient_accumulation_reduction_method"}
    for key in opts:
        if key in PIPELINE_REJECTED:
            raise ValueError(f"Found `{key}` key in `pipelining_kwargs`, which set_pipelining_"
                             "options does not accept")
        if key not in explicit | PIPELINE_KWARGS:
            raise TypeError(f"pipeline() got an unexpected keyword argument '{key}'")
    _steps(opts.get("gradient_accumulation_steps_per_replica"))
    _reduction(opts.get("gradient_accumulation_reduction_method", "sum"))
    mapping = opts.get("device_mapping")
    if mapping is not None and len(mapping) != num_stages:
        raise ValueError(f"device_mapping {mapping} must have one IPU per pipeline stage "
                         f"({num_stages})")
    if not isinstance(opts.get("pipeline_schedule", PipelineSchedule.Grouped), PipelineSchedule):
        raise TypeError("pipeline_schedule must be a PipelineSchedule")
    if not isinstance(opts.get("recomputation_mode", RecomputationMode.Auto), RecomputationMode):
        raise TypeError("recomputation_mode must be a RecomputationMode")
    for key in ("forward_propagation_stages_poplar_options",
                "backward_propagation_stages_poplar_options"):
        per_stage = opts.get(key)
        if per_stage is not None and (len(per_stage) != num_stages or not all(
                isinstance(o, PipelineStageOptions) for o in per_stage)):
            raise ValueError(f"{key} must be a list of {num_stages} PipelineStageOptions")
    if opts.get("pipeline_schedule") is PipelineSchedule.Interleaved and mapping is not None \
            and len(set(mapping)) != len(mapping):
        raise NotImplementedError(  # pipelining_ops.py, training graphs
            "The pipelining schedule 'Interleaved' does not currently support multiple "
            "pipeline stages on the same device for training graphs.")
    return opts


def check_gradient_accumulation_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """``set_gradient_accumulation_options(gradient_accumulation_steps_per_replica=None,
    gradient_accumulation_reduction_method='sum', use_v2_gradient_accumulation_optimizer=False,
    **gradient_accumulation_optimizer_kwargs)`` (functional_extensions.py); the kwargs go to
    ``GradientAccumulationOptimizerV2``; 'opt', 'num_mini_batches' and
    'experimental_normalize_gradients' are refused (``_set_gradient_accumulation_options_impl``)."""
    opts = dict(options)
    explicit = {"gradient_accumulation_steps_per_replica", "gradient_accumulation_reduction_method",
                "use_v2_gradient_accumulation_optimizer"}
    for key in opts:
        if key in ("opt", "num_mini_batches", "experimental_normalize_gradients"):
            raise ValueError(f"Found `{key}` key in `gradient_accumulation_optimizer_kwargs`.")
        if key not in explicit | ACCUMULATION_KWARGS:
            raise TypeError(f"GradientAccumulationOptimizerV2() got an unexpected keyword "
                            f"argument '{key}'")
    _steps(opts.get("gradient_accumulation_steps_per_replica"))
    _reduction(opts.get("gradient_accumulation_reduction_method", "sum"))
    return opts


def check_pipeline_depth(iterations: int, schedule: PipelineSchedule, num_stages: int,
                         training: bool = True) -> None:
    """tensorflow/compiler/plugin/poplar/driver/visitors/pipeline_visitor.cc,
    ``VerifyPipelineArguments``: the iteration count (the accumulation count M in ``fit``)
    must be a multiple of, and at least, the overlap length, the size of the union of
    stage offsets of the schedule (visitors/pipeline_visitor_utils.h): Grouped, every stage
    op (training: S forward + S backward); Interleaved, the circular union, S on distinct
    IPUs; Sequential, 1."""
    ops = 2 * num_stages if training else num_stages
    n = {PipelineSchedule.Grouped: ops, PipelineSchedule.Interleaved: num_stages,
         PipelineSchedule.Sequential: 1}[schedule]
    if iterations % n:
        raise ValueError(f"The number of iterations of the pipeline must be a multiple of {n}, "
                         f"but it is {iterations}.")
    if iterations < n:
        raise ValueError(f"The number of iterations of the pipeline must be at least {n}, but it "
                         f"is {iterations}.")


# --------------------------------------------------------------------------- fit


def fit_steps_per_replica(steps_per_epoch: int, replication_factor: int,
                          steps_per_execution: int, accumulation: int) -> int:
    """Micro-batch steps each replica runs in one ``fit`` epoch, with the SDK's checks:

    * ``keras/ipu/extensions/data_adapter.py``, ``IPUDataHandler._infer_steps``: ``return
      int(steps // self._replication_factor)`` (``steps_per_epoch`` counts all the local
      replicas' steps; the rest is dropped);
    * ``_validate_data_handler``: "`steps_per_execution` ({}) must be a divisor of the number
      of batches ({}) in the dataset provided to this replica." (a ``steps_per_execution``
      larger than the count is cut down to it first, with a warning);
    * ``keras/ipu/extensions/extensions_base.py``,
      ``_verify_and_get_gradient_accumulation_steps_per_replica``: ``steps_per_execution``
      divisible by ``gradient_accumulation_steps_per_replica`` (RuntimeError).
    """
    per_replica = int(steps_per_epoch // replication_factor)
    k = min(steps_per_execution, per_replica)
    if per_replica % k:
        raise ValueError(f"`steps_per_execution` ({k}) must be a divisor of the number of "
                         f"batches ({per_replica}) in the dataset provided to this replica.")
    if k % accumulation:
        raise RuntimeError(f"The pipelined model has been configured to use gradient "
                           f"accumulation for training, however the current "
                           f"`steps_per_execution` value (set to {k}) is not divisible by "
                           f"`gradient_accumulation_steps_per_replica` ({accumulation}).")
    return per_replica


# --------------------------------------------------------------------------- IPUConfig


class StochasticRoundingBehaviour(enum.Enum):
    """tensorflow/python/ipu/config.py"""
    OFF = 0
    ON = 1
    REPLICA_IDENTICAL_ONLY = 2


class DeviceConnectionType(enum.Enum):
    """tensorflow/python/ipu/config.py"""
    ALWAYS = 0
    ON_DEMAND = 1
    PRE_COMPILE = 2
    NEVER = 3


class _Strict:
    """tensorflow/python/ipu/config.py ``_ConfigBase``: an unknown attribute raises
    "'k' is not a valid attribute of this config."; a value of another type than the
    default raises "Trying to set ... but it must be of type ..." (``auto_select_ipus``
    also takes an int, which it turns into ``[int]``)."""

    def __init__(self, **defaults):
        object.__setattr__(self, "_defaults", defaults)
        for k, v in defaults.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, key, value):
        if key not in self._defaults:
            raise ValueError(f"'{key}' is not a valid attribute of this config.")
        default = self._defaults[key]
        if key == "auto_select_ipus" and isinstance(value, int):
            value = [value]
        if isinstance(default, _Strict) or type(value) != type(default):  # noqa: E721
            raise TypeError(f"Trying to set {key} to {value!r}, but it must be of type "
                            f"{type(default).__name__}")
        object.__setattr__(self, key, value)


def ipu_config() -> _Strict:
    """The ``IPUConfig`` attributes ipu.py sets, with the SDK's defaults."""
    return _Strict(
        allow_recompute=False, auto_select_ipus=[],
        matmuls=_Strict(poplar_options={}), convolutions=_Strict(poplar_options={}),
        floating_point_behaviour=_Strict(esr=StochasticRoundingBehaviour.OFF),
        ipu_model=_Strict(compile_ipu_code=True, tiles_per_ipu=0, version="ipu2"),
        device_connection=_Strict(type=DeviceConnectionType.ALWAYS, enable_remote_buffers=False))


# the SDK names ipu.py reads from the namespace ``ipu.sdk()`` returns
SDK = SimpleNamespace(
    PipelineSchedule=PipelineSchedule, RecomputationMode=RecomputationMode,
    PipelineStageOptions=PipelineStageOptions,
    reduction_mean=GradientAccumulationReductionMethod.MEAN,
    stochastic_rounding_on=StochasticRoundingBehaviour.ON,
    device_on_demand=DeviceConnectionType.ON_DEMAND, popdist=None)


# --------------------------------------------------------------------------- compile


def compile_optimizer(optimizer, policy_name: str):
    """``keras/engine/training.py`` ``Model._get_optimizer`` under ``compile``: with the
    ``mixed_float16`` policy an optimizer that is not a ``LossScaleOptimizer`` is wrapped
    in a dynamic one (``loss_scale = 'dynamic'`` ... ``opt = lso.LossScaleOptimizer(opt)``)."""
    from ipu_diffusion._keras import keras

    lso = keras.mixed_precision.LossScaleOptimizer
    if policy_name == "mixed_float16" and not isinstance(optimizer, lso):
        return lso(optimizer)
    return optimizer
