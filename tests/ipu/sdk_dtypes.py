"""The dtypes an IPU can compile, as a checker of traced ``tf.function`` graphs.

The Poplar XLA backend registers its device kernels for a fixed set of types,
``GetIPUSupportedTypes()`` in ``tensorflow/compiler/plugin/poplar/driver/xla_ipu_common.cc``
of graphcore/tensorflow::

    std::vector<DataType> supported = {DT_INT32, DT_INT64, DT_FLOAT, DT_HALF,
                                       DT_BOOL};
    if (getenv("TF_POPLAR_GFLOAT") != nullptr) {
      supported.push_back(DT_INT8);
      supported.push_back(DT_INT16);
    }

(``OpFilter`` in the same file adds a few exceptions for single ops: ``Const`` of
string/uint8/int8, ``Cast`` from/to (u)int8 for data feeding, ``Assert`` of string, and
resource/variant arguments of ``Function``/``Pipeline``-like ops.) A graph that computes
in any other type (uint32, float64, bfloat16, ...) on the device does not compile, yet
runs fine on a CPU. :func:`non_ipu_dtypes` finds such tensors in what the CPU traced.

It is deliberately strict: only the five types above plus ``resource`` and ``variant``
handles (variables, optional/list handles) pass; the OpFilter exceptions and the
``TF_POPLAR_GFLOAT`` types do not, so a report means "look at this", not necessarily
"this cannot compile".
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Set, Tuple

import tensorflow as tf
from tensorflow.python.framework import op_def_registry

IPU_DTYPES = frozenset({tf.int32, tf.int64, tf.float32, tf.float16, tf.bool})
HANDLE_DTYPES = frozenset({tf.resource, tf.variant})
ALLOWED_DTYPES = IPU_DTYPES | HANDLE_DTYPES

Violation = Tuple[str, str, str]  # (op or function/node name, op type, dtype name)


def _dtype(enum: int):
    """``tf.DType`` of a DataType enum, or None for DT_INVALID (an unset type)."""
    return tf.as_dtype(enum) if enum else None


def _attr_dtypes(attr) -> Iterable[Tuple[str, object]]:
    """(attr name, dtype) of every ``type`` / ``list(type)`` attr and tensor-valued attr
    of a NodeDef's attr map. String, int, shape and func attrs are not tensors: skipped."""
    for name in sorted(attr):
        value = attr[name]
        kind = value.WhichOneof("value")
        if kind == "type":
            dt = _dtype(value.type)
            if dt is not None:
                yield name, dt
        elif kind == "list":
            for enum in value.list.type:
                dt = _dtype(enum)
                if dt is not None:
                    yield name, dt
            for tensor in value.list.tensor:
                dt = _dtype(tensor.dtype)
                if dt is not None:
                    yield name, dt
        elif kind == "tensor":
            dt = _dtype(value.tensor.dtype)
            if dt is not None:
                yield name, dt


def _arg_dtypes(args, attr) -> Iterable[object]:
    """Dtypes of the input or output args of an OpDef (or a function signature) as
    instantiated by a node's attrs: fixed ``type``, ``type_attr`` or ``type_list_attr``."""
    for arg in args:
        if arg.type:
            yield tf.as_dtype(arg.type)
        elif arg.type_attr and arg.type_attr in attr:
            dt = _dtype(attr[arg.type_attr].type)
            if dt is not None:
                yield dt
        elif arg.type_list_attr and arg.type_list_attr in attr:
            for enum in attr[arg.type_list_attr].list.type:
                dt = _dtype(enum)
                if dt is not None:
                    yield dt


def _node_dtypes(node, signatures: Dict[str, object]) -> Iterable[Tuple[str, object]]:
    """Everything typed about one NodeDef: its type attrs and its (resolved) input and
    output tensor dtypes; a call of a library function resolves through its signature."""
    yield from _attr_dtypes(node.attr)
    op_def = op_def_registry.get(node.op)
    if op_def is None:
        op_def = signatures.get(node.op)
    if op_def is not None:
        for dt in _arg_dtypes(op_def.input_arg, node.attr):
            yield "input", dt
        for dt in _arg_dtypes(op_def.output_arg, node.attr):
            yield "output", dt


def non_ipu_dtypes(function) -> List[Violation]:
    """Every dtype outside int32/int64/float32/float16/bool (and resource/variant handles)
    in a traced function: a ``ConcreteFunction`` (``f.get_concrete_function(...)``), a
    ``tf.function`` with exactly one trace, or a ``tf.Graph``.

    Walks every op of the graph (attrs and input/output tensor dtypes) and every function
    of its function library, recursively including functions those call (``tf.cond``
    branches, ``while`` bodies, nested ``tf.function`` s such as jit-compiled ones, gradient
    functions): each library function's signature and each of its nodes. Returns sorted
    unique ``(name, op type, dtype name)``, with ``name`` an op name or
    ``function_name/node_name``; empty when everything is IPU-compatible.
    """
    graph = _graph_of(function)
    graph_def = graph.as_graph_def()
    library = {f.signature.name: f for f in graph_def.library.function}
    signatures = {name: f.signature for name, f in library.items()}
    found: Set[Violation] = set()

    def check(where: str, op_type: str, dtypes: Iterable[object]) -> None:
        for dt in dtypes:
            if dt not in ALLOWED_DTYPES:
                found.add((where, op_type, dt.name))

    for op in graph.get_operations():
        check(op.name, op.type, [t.dtype for t in op.inputs])
        check(op.name, op.type, [t.dtype for t in op.outputs])
    for node in graph_def.node:
        check(node.name, node.op, (dt for _, dt in _node_dtypes(node, signatures)))
    for fname, fdef in library.items():
        sig = fdef.signature
        check(fname, "FunctionSignature", _arg_dtypes(sig.input_arg, fdef.attr))
        check(fname, "FunctionSignature", _arg_dtypes(sig.output_arg, fdef.attr))
        for node in fdef.node_def:
            check(f"{fname}/{node.name}", node.op,
                  (dt for _, dt in _node_dtypes(node, signatures)))
    return sorted(found)


def _graph_of(function) -> tf.Graph:
    if isinstance(function, tf.Graph):
        return function
    graph = getattr(function, "graph", None)
    if graph is not None:
        return graph
    traces = function._list_all_concrete_functions()  # noqa: SLF001 (a tf.function)
    if len(traces) != 1:
        raise ValueError(f"{function!r} has {len(traces)} traces; pass a concrete function")
    return traces[0].graph


def format_violations(found: List[Violation], limit: int = 40) -> str:
    """A readable list for an assertion message."""
    lines = [f"  {dtype:<9} {op_type:<24} {where}" for where, op_type, dtype in found[:limit]]
    if len(found) > limit:
        lines.append(f"  ... and {len(found) - limit} more")
    return "\n".join(lines)
