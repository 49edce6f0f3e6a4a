"""Stand-in for the Poplar SDK's pipeline stage assignment of a Keras functional model.

A line-by-line port of graphcore/keras, branch ``r2.6/sdk-release-3.4`` (commit 164c0e60):

* ``keras/ipu/extensions/extensions_base.py``, ``KerasExtensionBase._create_post_order``;
* ``keras/ipu/extensions/functional_extensions.py``, ``FunctionalExtension.
  get_pipeline_stage_assignment``, ``set_pipeline_stage_assignment`` and
  ``_get_pipelined_post_order`` (the validation ``set_pipeline_stage_assignment`` runs);
* ``keras/ipu/extensions/pipeline_stage_assignment.py``, the two assignment classes.

It runs on the Keras 2 functional internals the fork shares with ``tf_keras`` (``Node.
flat_input_ids``, ``flat_output_ids``, ``map_arguments``, ``Functional._nodes_by_depth``,
``_tensor_usage_count``), so it needs ``TF_USE_LEGACY_KERAS=1``. Kept as in the SDK,
including what is arguably its bug: for a nested model it marks ``str(id(x)) for x in
inputs`` as computed, where ``inputs`` are the nested call's positional arguments, so a
nested model called with a dict (or a list) fails with "has a dependency from a pipeline
stage which has not yet been executed".
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import tensorflow as tf


class LayerAssignment:
    """``FunctionalLayerPipelineStageAssignment`` (pipeline_stage_assignment.py)."""

    is_nested_model = False

    def __init__(self, layer, node_index: int, pipeline_stage: Optional[int] = None):
        self.layer, self.node_index, self.pipeline_stage = layer, node_index, pipeline_stage


class NestedAssignment:
    """``FunctionalNestedModelPipelineStageAssignment`` (pipeline_stage_assignment.py)."""

    is_nested_model = True

    def __init__(self, nested_model, node_index: int, pipeline_stage_assignments: List[Any]):
        self.nested_model, self.node_index = nested_model, node_index
        self.pipeline_stage_assignments = pipeline_stage_assignments

    @property
    def layer(self):  # the SDK's error messages read ``assignment.layer.name``
        return self.nested_model


def _is_model(layer) -> bool:
    # the SDK tests isinstance(layer, extensions_base.KerasExtensionBase): every Keras
    # Model of the fork carries the IPU extension
    from ipu_diffusion._keras import keras

    return isinstance(layer, keras.Model)


def create_post_order(model) -> List[Any]:
    """``KerasExtensionBase._create_post_order``: the model's layer invocations (nodes),
    input layers excluded, in execution order."""
    order = []
    visited = set(str(id(x)) for x in model.inputs)
    for depth in sorted(model._nodes_by_depth.keys(), reverse=True):  # noqa: SLF001
        for node in model._nodes_by_depth[depth]:  # noqa: SLF001
            if node.is_input:
                continue
            if any(t_id not in visited for t_id in node.flat_input_ids):
                continue
            visited.update(node.flat_output_ids)
            order.append(node)
    assert len(order) == len(model._network_nodes) - len(model.inputs)  # noqa: SLF001
    return order


def get_pipeline_stage_assignment(model) -> List[Any]:
    """``FunctionalExtension.get_pipeline_stage_assignment`` (no assignment set yet)."""
    out: List[Any] = []
    for node in create_post_order(model):
        layer = node.layer
        index = layer._inbound_nodes.index(node)  # noqa: SLF001
        if _is_model(layer):
            out.append(NestedAssignment(layer, index, get_pipeline_stage_assignment(layer)))
        else:
            out.append(LayerAssignment(layer, index))
    return out


def pipelined_post_order(model, assignment: List[Any], inputs=None):
    """``FunctionalExtension._get_pipelined_post_order``: ``(post_order_per_stage,
    output_tensors)``; raises ValueError with the SDK's messages."""
    from tf_keras.src.engine import node as node_module

    post_order_per_stage: Dict[int, List[Any]] = {}
    post_order = create_post_order(model)
    if not isinstance(assignment, list):
        raise ValueError("`pipeline_stage_assignment` needs to be a list.")
    if len(assignment) != len(post_order):
        raise ValueError(
            f"The length of the provided `pipeline_stage_assignment` ({len(assignment)}) does "
            f"not match the number of layers in the graph ({len(post_order)}). Each layer needs "
            "to be assigned a pipeline stage (excluding input layers).")
    tensor_dict: Dict[str, List[Any]] = {}

    def visited(tensors, new_tensors=None):
        tensors = tf.nest.flatten(tensors)
        ids = [str(id(t)) for t in tensors]
        if new_tensors is not None:
            tensors = tf.nest.flatten(new_tensors)
        for t_id, tensor in zip(ids, tensors):
            tensor_dict[t_id] = [tensor] * model._tensor_usage_count[t_id]  # noqa: SLF001

    visited(model.inputs, inputs)
    if inputs is None:
        for tensor in model.inputs:
            layer = tensor._keras_history.layer  # noqa: SLF001
            assert len(layer.inbound_nodes) == 1
            post_order_per_stage.setdefault(0, []).append(layer.inbound_nodes[0])
    stages = set()
    for a, node in zip(assignment, post_order):
        if _is_model(node.layer):
            if not isinstance(a, NestedAssignment):
                raise ValueError(f"The pipeline stage assignment for nested model "
                                 f"{node.layer.name} in {model.name} must be an instance of "
                                 f"`FunctionalNestedModelPipelineStageAssignment`.")
            if id(a.nested_model) != id(node.layer):
                raise ValueError(f"The order of `pipeline_stage_assignment` does not match the "
                                 f"post-order generated from the graph ({a.layer.name} != "
                                 f"{node.layer.name}).")
            new_args, _ = node.map_arguments(tensor_dict)
            nested_per_stage, output_tensors = pipelined_post_order(
                node.layer, a.pipeline_stage_assignments, inputs=new_args)
            visited(node.outputs, output_tensors)
            stages.update(nested_per_stage)
            for stage, nested in nested_per_stage.items():
                post_order_per_stage.setdefault(stage, []).extend(nested)
            continue
        if not isinstance(a, LayerAssignment):
            raise ValueError(f"The pipeline stage assignment for layer {node.layer.name} in "
                             f"{model.name} must be an instance of "
                             "`FunctionalLayerPipelineStageAssignment`.")
        if id(a.layer) != id(node.layer):
            raise ValueError(f"The order of `pipeline_stage_assignment` does not match the "
                             f"post-order generated from the graph ({a.layer.name} != "
                             f"{node.layer.name}).")
        if a.pipeline_stage is None:
            raise ValueError(f"Layer {a.layer.name} with node_index {a.node_index} has not been "
                             "assigned a pipeline stage in `pipeline_stage_assignment`.")
        new_args, new_kwargs = node.map_arguments(tensor_dict)
        new_outputs = node.layer(*new_args, **new_kwargs)
        visited(node.outputs, new_outputs)
        new_node = node_module.Node(node.layer, new_args, new_kwargs, new_outputs)
        post_order_per_stage.setdefault(a.pipeline_stage, []).append(new_node)
        stages.add(a.pipeline_stage)
    computed = set()
    if inputs is not None:
        computed.update(str(id(x)) for x in inputs)  # the positional arguments' ids only
    for stage_id in range(max(stages) + 1):
        for node in post_order_per_stage.get(stage_id, []):
            if not all(x in computed for x in node.flat_input_ids):
                raise ValueError(
                    f"Layer {node.outbound_layer.name} in pipeline stage {stage_id} has a "
                    "dependency from a pipeline stage which has not yet been executed. Layers "
                    "can only use outputs from current or previous pipeline stages.")
            computed.update(node.flat_output_ids)
    output_tensors = [tensor_dict[str(id(x))].pop() for x in tf.nest.flatten(model.outputs)]
    return post_order_per_stage, output_tensors


def contiguous_stages(assignment: List[Any]) -> List[int]:
    """The stages used, 0 .. S-1 with none missing. SDK 3.4 has no message for a gap: the
    fit that follows fails with a KeyError on ``post_order_per_stage[stage_id]`` in
    ``extensions_base.py`` ``_compute_pipeline_tensor_usage_count`` (the wording here is
    the 2.x ``functional_extensions.py`` one)."""
    used = sorted({a.pipeline_stage for a in _flat(assignment)})
    missing = sorted(set(range(used[-1] + 1)) - set(used))
    if missing:
        raise ValueError(f"Pipeline stages in the graph need to be strictly increasing, found "
                         f"pipeline stages {used}, however the following pipeline stages are "
                         f"missing {missing}.")
    return used


def _flat(assignment: List[Any]) -> List[Any]:
    out: List[Any] = []
    for a in assignment:
        out.extend(_flat(a.pipeline_stage_assignments) if a.is_nested_model else [a])
    return out


class PipelinedModel:
    """The three stage methods of the fork's functional model, on a real ``tf_keras`` model,
    with the SDK's validation; ``set_pipelining_options`` records its keyword arguments
    (``sdk_options.check_pipelining_options`` checks them)."""

    def __init__(self, model):
        self.model, self.assignment, self.pipelining, self.accumulation = model, None, None, None
        self.layers = model.layers

    def get_pipeline_stage_assignment(self) -> List[Any]:
        return get_pipeline_stage_assignment(self.model)

    def set_pipeline_stage_assignment(self, assignment: List[Any]) -> None:
        pipelined_post_order(self.model, assignment)
        contiguous_stages(assignment)
        self.assignment = assignment

    def set_pipelining_options(self, **kwargs) -> None:
        self.pipelining = kwargs

    def set_gradient_accumulation_options(self, **kwargs) -> None:
        self.accumulation = kwargs
