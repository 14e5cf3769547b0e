"""Fold shape computations that only depend on static dims into constants.

Exporters often compute Reshape targets and Slice bounds at run time from ``Shape`` nodes,
for example ``x.view(x.size(0), -1)`` becomes ``Shape -> Gather -> Unsqueeze -> Concat ->
Reshape``. The analysis treats a run-time shape as a barrier, so this pass evaluates such
subgraphs symbolically on the dims that shape inference found:

- a value whose entries are all known integers (static dims and constants) replaces the node
  that computed it, as an initializer of the same name;
- a Reshape target whose entries are integers or the Reshape input's own dim at the same
  position (typically the batch dim, also when read from another tensor with the same
  symbolic dim name) becomes a constant target with 0 at those positions, which ONNX defines
  as "copy this dim from the input"; with ``allowzero`` set, the one such dim becomes -1.

Both rewrites compute the same tensors for every input the original model accepts, because a
static dim has one value for all inputs. The evaluator understands Shape, Gather, Slice,
Squeeze, Unsqueeze, Concat, Cast, Identity, Add, Sub, Mul, Div and ReduceProd on small
integer tensors; anything else leaves the value unknown and the graph unchanged. Nodes left
without readers afterwards are removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import GraphIndex, attribute, subgraph_references

logger = logging.getLogger(__name__)

# Integer tensors with more elements than this are not shape values.
MAX_SHAPE_ELEMENTS = 64
INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Dim:
    """Dim ``axis`` of ``tensor``, whose value is only known at run time."""

    tensor: str
    axis: int


def _entries(value) -> list:
    return list(np.asarray(value, dtype=object).reshape(-1))


def fold_shape_computations(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold static shape computations in place and return ``model``."""
    index = GraphIndex(model)
    values: dict[str, np.ndarray] = {}
    for name, tensor in index.initializers.items():
        if tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and int(np.prod(tensor.dims)) <= MAX_SHAPE_ELEMENTS:
            values[name] = index.array(name).astype(object)

    for node in index.nodes:
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        try:
            result = _evaluate(node, index, values)
        except (ValueError, IndexError, TypeError, ZeroDivisionError):
            result = None
        if result is not None and not isinstance(result, np.ndarray):
            scalar = np.empty((), dtype=object)
            scalar[()] = result  # np.take returns a bare element for a scalar index
            result = scalar
        if result is not None and result.size <= MAX_SHAPE_ELEMENTS:
            values[node.output[0]] = result

    graph = model.graph
    folded = 0
    constants = {}
    taken = set(index.initializers) | set(index.producer) | set(index.graph_inputs)
    for node in graph.node:
        output = node.output[0] if len(node.output) == 1 else ""
        if output in index.graph_outputs:
            continue  # a graph output stays computed by a node
        if output in values and output not in index.initializers and all(isinstance(e, (int, np.integer)) for e in _entries(values[output])):
            if node.op_type != "Constant":
                dtype = np.int32 if index.elem_types.get(output) == onnx.TensorProto.INT32 else np.int64
                constants[output] = np.array(values[output].astype(dtype))
    if constants:
        kept = [node for node in graph.node if not (len(node.output) == 1 and node.output[0] in constants)]
        del graph.node[:]
        graph.node.extend(kept)
        for name, array in constants.items():
            graph.initializer.append(numpy_helper.from_array(array, name))
        folded += len(constants)

    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] in constants:
            continue
        target = values.get(node.input[1])
        if target is None or target.ndim != 1:
            continue
        entries = _static_reshape_target(index, node, _entries(target))
        if entries is not None:
            name = _unique_name(f"{node.input[1]}_static", taken)
            graph.initializer.append(numpy_helper.from_array(np.array(entries, dtype=np.int64), name))
            node.input[1] = name
            folded += 1

    if folded:
        removed = _remove_dead_nodes(graph)
        logger.debug("folded %d shape computations, removed %d nodes", folded, removed)
    return model


def _unique_name(base: str, taken: set[str]) -> str:
    name, suffix = base, 1
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    taken.add(name)
    return name


def _static_reshape_target(index: GraphIndex, node: onnx.NodeProto, entries: list) -> list[int] | None:
    """Return a constant Reshape target equal to ``entries``, or None if there is none."""
    allowzero = attribute(node, "allowzero", 0)
    copied = [position for position, entry in enumerate(entries) if isinstance(entry, Dim)]
    if any(not isinstance(entry, (int, np.integer, Dim)) for entry in entries):
        return None
    if not all(_same_dim(index, entries[position], node.input[0], position) for position in copied):
        return None
    result = [int(entry) if not isinstance(entry, Dim) else 0 for entry in entries]
    if not allowzero:
        return result  # 0 copies the input's dim at that position
    # With allowzero a 0 is a real zero, so the one copied dim becomes -1 (inferred) instead.
    if len(copied) != 1 or -1 in result:
        return None
    result[copied[0]] = -1
    return result


def _same_dim(index: GraphIndex, dim: Dim, tensor: str, axis: int) -> bool:
    """Return True if ``dim`` is dim ``axis`` of ``tensor``, or carries the same symbolic name."""
    if dim.tensor == tensor and dim.axis == axis:
        return True
    source, target = index.shapes.get(dim.tensor), index.shapes.get(tensor)
    if source is None or target is None or axis >= len(target):
        return False
    # ONNX gives dims with the same dim_param the same value.
    name = source[dim.axis]
    return isinstance(name, str) and name == target[axis]


def _evaluate(node: onnx.NodeProto, index: GraphIndex, values: dict[str, np.ndarray]) -> np.ndarray | None:
    op = node.op_type
    if op == "Shape":
        shape = index.shapes.get(node.input[0])
        if shape is None:
            return None
        dims = [d if isinstance(d, int) else Dim(node.input[0], axis) for axis, d in enumerate(shape)]
        start, end = attribute(node, "start", 0), attribute(node, "end", None)
        return np.array(dims[start:end], dtype=object)

    inputs = [values.get(name) if name else None for name in node.input]
    if any(value is None for value, name in zip(inputs, node.input) if name):
        return None

    if op == "Identity":
        return inputs[0]
    if op == "Cast":
        # Only integer casts stay shape values; a float result is data, not a shape.
        return inputs[0] if attribute(node, "to") in INTEGER_TYPES else None
    if op == "Gather":
        axis = attribute(node, "axis", 0)
        if axis != 0 or inputs[0].ndim != 1:
            return None
        return np.take(inputs[0], np.asarray(inputs[1].astype(np.int64)), axis=0)
    if op == "Reshape":
        entries = _entries(inputs[1])
        if not all(isinstance(e, (int, np.integer)) for e in entries) or 0 in entries:
            return None
        return inputs[0].reshape([int(e) for e in entries])
    if op in ("Squeeze", "Unsqueeze"):
        axes = attribute(node, "axes")
        if axes is None and len(inputs) > 1 and inputs[1] is not None:
            axes = [int(e) for e in _entries(inputs[1])]
        data = inputs[0]
        if op == "Squeeze":
            if axes is None:
                return data.reshape([d for d in data.shape if d != 1])
            return np.squeeze(data, axis=tuple(a % data.ndim for a in axes))
        if axes is None:
            return None
        rank = data.ndim + len(axes)
        return np.expand_dims(data, axis=tuple(sorted(a % rank for a in axes)))
    if op == "Concat":
        if attribute(node, "axis", 0) not in (0, -1):
            return None
        return np.concatenate([value.reshape(-1) for value in inputs])
    if op == "Slice":
        data = inputs[0]
        if data.ndim != 1 or len(inputs) < 3:
            return None
        start, end = int(inputs[1][0]), int(inputs[2][0])
        step = int(inputs[4][0]) if len(inputs) > 4 and inputs[4] is not None else 1
        return data[slice(start, end, step)]
    if op in ("Add", "Sub", "Mul", "Div"):
        return _arithmetic(op, inputs[0], inputs[1])
    if op == "ReduceProd":
        entries = _entries(inputs[0])
        if not all(isinstance(e, (int, np.integer)) for e in entries):
            return None
        product = int(np.prod([int(e) for e in entries]))
        return np.array([product] if attribute(node, "keepdims", 1) else product, dtype=object)
    return None


def _arithmetic(op: str, left: np.ndarray, right: np.ndarray) -> np.ndarray | None:
    a, b = np.broadcast_arrays(left, right)
    out = np.empty(a.shape, dtype=object)
    for position in np.ndindex(a.shape):
        x, y = a[position], b[position]
        if not isinstance(x, (int, np.integer)) or not isinstance(y, (int, np.integer)):
            return None
        x, y = int(x), int(y)
        if op == "Div":
            if y == 0:
                return None
            result = abs(x) // abs(y) * (1 if (x < 0) == (y < 0) else -1)  # truncates, as in C
        else:
            result = {"Add": x + y, "Sub": x - y, "Mul": x * y}[op]
        if not INT64_MIN <= result <= INT64_MAX:
            return None  # the runtime would wrap around; leave such arithmetic alone
        out[position] = result
    return out


def _remove_dead_nodes(graph: onnx.GraphProto) -> int:
    removed = 0
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        used |= subgraph_references(graph)
        kept = [node for node in graph.node if any(name in used for name in node.output if name)]
        if len(kept) == len(graph.node):
            return removed
        removed += len(graph.node) - len(kept)
        del graph.node[:]
        graph.node.extend(kept)
