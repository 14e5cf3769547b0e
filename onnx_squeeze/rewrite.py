"""Carry out a removal plan on a copy of the model; no decision is made here.

For every weight op the rows of removed output units and the columns of removed input units
are sliced away, and the constants of removed dead inputs are added to the bias first
(``c += V[:, j] * a_j``). Element-wise constant operands (biases added after MatMul, PReLU
slopes, per-channel scales) are sliced with the units they line up with, Reshape targets that
name a channel count get the new count, and a graph input that loses features gets a
``Gather`` right after it.

Initializers are never sliced in place when another node reads them differently: each
distinct new value gets its own copy. Every new array keeps the dtype of the tensor it
replaces. Shape information is inferred again from scratch, so no stale ``value_info`` stays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .analysis import Plan
from .layers import Layer
from .normalize import infer_shapes
from .ops import BINARY_OPS
from .channelwise import CHANNEL_OPS
from .index_ops import rewrite_slice, selections, slice_spec
from .units import aligned_axis, gather_axis

logger = logging.getLogger(__name__)


@dataclass
class LayerChange:
    """The change one round made to one weight op, in the indices of that round's input model."""

    node: str
    weight: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    out_units: int
    in_units: int
    removed_out: np.ndarray
    removed_in: np.ndarray
    folded: bool


class _Edits:
    """New values for initializer inputs, keyed by (node position, input slot)."""

    def __init__(self, plan: Plan):
        self.index = plan.index
        self.values: dict[tuple[int, int], np.ndarray] = {}
        self.added: list[onnx.TensorProto] = []
        self._taken = set(plan.index.initializers) | set(plan.index.producer) | set(plan.index.graph_inputs)
        self._taken |= {node.name for node in plan.index.nodes}

    def unique(self, base: str) -> str:
        """Return a tensor or node name not used anywhere in the model."""
        name, suffix = base, 1
        while name in self._taken:
            suffix += 1
            name = f"{base}_{suffix}"
        self._taken.add(name)
        return name

    def add_initializer(self, base: str, array: np.ndarray) -> str:
        name = self.unique(base)
        self.added.append(numpy_helper.from_array(array, name))
        return name

    def get(self, node: int, slot: int) -> np.ndarray:
        key = (node, slot)
        if key not in self.values:
            name = self.index.nodes[node].input[slot]
            self.values[key] = np.array(self.index.array(name))
        return self.values[key]

    def set(self, node: int, slot: int, array: np.ndarray) -> None:
        self.values[(node, slot)] = array


def apply_plan(plan: Plan) -> tuple[onnx.ModelProto, list[LayerChange]]:
    """Return the rewritten model and the per-layer changes; ``plan.index.model`` is not modified."""
    model = onnx.ModelProto()
    model.CopyFrom(plan.index.model)
    graph = model.graph
    edits = _Edits(plan)
    inserted: dict[int, list[onnx.NodeProto]] = {}
    changes = []

    for layer in plan.layers():
        change = _rewrite_layer(plan, layer, edits, graph, inserted)
        if change is not None:
            changes.append(change)

    _slice_elementwise_constants(plan, edits)
    _rewrite_reshape_targets(plan, edits)
    _rewrite_gather_indices(plan, edits)
    changes.extend(_slice_channel_params(plan, edits, graph))
    _rewrite_selections(plan, edits, graph)
    _apply_edits(model, edits)

    graph.initializer.extend(edits.added)

    nodes = [_gather_input(plan, name, edits, graph) for name in plan.gather_inputs if name in plan.index.graph_inputs]
    for position, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(inserted.get(position, []))
        nodes.extend(_gather_input(plan, name, edits, graph) for name in plan.gather_inputs if name in node.output)
    del graph.node[:]
    graph.node.extend(nodes)

    _drop_unused_initializers(graph)
    return infer_shapes(model), changes


def _take(array: np.ndarray, keep: np.ndarray | None, axis: int) -> np.ndarray:
    return array if keep is None else np.take(array, keep, axis=axis)


def _rewrite_layer(plan: Plan, layer: Layer, edits: _Edits, graph, inserted) -> LayerChange | None:
    keep_out = plan.keep(layer.output)
    keep_in = plan.keep(layer.input)
    delta = plan.fold(layer)
    if keep_out is None and keep_in is None and delta is None:
        return None

    weight = edits.get(layer.node, layer.weight_slot)
    before = weight.shape
    if layer.groups > 1:
        weight = _slice_grouped_weight(weight, keep_out, keep_in, layer)
    else:
        weight = _take(_take(weight, keep_out, layer.weight_out_axis), keep_in, layer.weight_in_axis)
    edits.set(layer.node, layer.weight_slot, weight)

    node = graph.node[layer.node]
    if layer.op_type == "Gemm":
        _rewrite_gemm_bias(plan, layer, delta, keep_out, edits, node)
    elif layer.op_type in ("Conv", "ConvTranspose"):
        _rewrite_conv_bias(plan, layer, delta, keep_out, edits, node)
    elif delta is not None:
        _fold_into_matmul_bias(plan, layer, delta, keep_out, edits, node, inserted)

    out_units, in_units = layer.out_units, layer.in_units
    return LayerChange(
        node=layer.name,
        weight=layer.weight,
        shape_before=tuple(before),
        shape_after=tuple(weight.shape),
        out_units=out_units,
        in_units=in_units,
        removed_out=np.setdiff1d(np.arange(out_units), keep_out) if keep_out is not None else np.zeros(0, int),
        removed_in=np.setdiff1d(np.arange(in_units), keep_in) if keep_in is not None else np.zeros(0, int),
        folded=delta is not None,
    )


def _slice_grouped_weight(weight: np.ndarray, keep_out, keep_in, layer: Layer) -> np.ndarray:
    """Slice a grouped conv weight [C_out, C_in / groups, k...] group by group.

    The analysis guarantees that every group keeps the same number of inputs and outputs.
    """
    groups = layer.groups
    out_per_group, in_per_group = weight.shape[0] // groups, weight.shape[1]
    keep_out = np.arange(weight.shape[0]) if keep_out is None else keep_out
    keep_in = np.arange(in_per_group * groups) if keep_in is None else keep_in
    blocks = []
    for group in range(groups):
        rows = keep_out[(keep_out // out_per_group) == group]
        local_in = keep_in[(keep_in // in_per_group) == group] - group * in_per_group
        blocks.append(weight[rows][:, local_in])
    assert len({block.shape for block in blocks}) == 1, "groups of unequal size after removal"
    return np.concatenate(blocks, axis=0)


def _rewrite_gemm_bias(plan: Plan, layer: Layer, delta, keep_out, edits: _Edits, node) -> None:
    has_c = len(node.input) > 2 and node.input[2] != ""
    if has_c and (not layer.replace_bias or delta is None):
        # With beta == 0 and nothing to fold, C is ignored but must still match the width.
        current = edits.get(layer.node, 2)
        if delta is None and current.size != layer.out_units:
            return  # a scalar C broadcasts to any width
        full = np.broadcast_to(current.reshape(-1), (layer.out_units,)).astype(np.float64)
        if delta is not None:
            full = full + delta / layer.bias.divisor
        shape = (1, -1) if current.ndim == 2 else (-1,)
        edits.set(layer.node, 2, _take(full, keep_out, 0).astype(current.dtype).reshape(shape))
        return
    if delta is None:
        return
    # No C, or C ignored because beta == 0: C becomes the fold and beta becomes 1.
    dtype = plan.index.array(layer.weight).dtype
    name = edits.add_initializer(f"{node.name}_folded_bias", _take(delta, keep_out, 0).astype(dtype))
    _set_input(node, 2, name)
    _set_attribute(node, "beta", 1.0)


def _rewrite_conv_bias(plan: Plan, layer: Layer, delta, keep_out, edits: _Edits, node) -> None:
    if len(node.input) > 2 and node.input[2] != "":
        bias = edits.get(layer.node, 2).astype(np.float64)
        if delta is not None:
            bias = bias + delta
        edits.set(layer.node, 2, _take(bias, keep_out, 0).astype(edits.get(layer.node, 2).dtype))
    elif delta is not None:
        dtype = plan.index.array(layer.weight).dtype
        _set_input(node, 2, edits.add_initializer(f"{node.name}_folded_bias", _take(delta, keep_out, 0).astype(dtype)))


def _fold_into_matmul_bias(plan: Plan, layer: Layer, delta, keep_out, edits: _Edits, node, inserted) -> None:
    if layer.bias is not None:
        # The bias Add's constant is sliced with the output units later, so add at full width.
        current = edits.get(layer.bias.node, layer.bias.slot)
        full = current.astype(np.float64) + delta.reshape((1,) * (current.ndim - 1) + (-1,))
        edits.set(layer.bias.node, layer.bias.slot, full.astype(current.dtype))
        return

    # MatMul without a bias Add: insert one so that every reader of the output gets the fold.
    dtype = plan.index.array(layer.weight).dtype
    name = edits.add_initializer(f"{node.name}_folded_bias", _take(delta, keep_out, 0).astype(dtype))
    unbiased = edits.unique(f"{layer.output}_before_fold")
    node.output[0] = unbiased
    add = helper.make_node("Add", [unbiased, name], [layer.output], name=edits.unique(f"{node.name}_fold_add"))
    inserted.setdefault(layer.node, []).append(add)


def _slice_elementwise_constants(plan: Plan, edits: _Edits) -> None:
    index = plan.index
    for position, node in enumerate(index.nodes):
        if plan.roles[position].kind != "binary" or node.op_type not in BINARY_OPS:
            continue
        output = node.output[0]
        keep = plan.keep(output)
        if keep is None:
            continue
        out_axis, size = plan.space.axis[output], plan.space.size[output]
        for slot, name in enumerate(node.input):
            if not index.is_constant(name):
                continue
            axis = aligned_axis(index, name, output, out_axis)
            current = edits.get(position, slot)
            if axis is not None and current.shape[axis] == size:
                edits.set(position, slot, np.take(current, keep, axis=axis))


def _slice_channel_params(plan: Plan, edits: _Edits, graph) -> list[LayerChange]:
    """Slice per-channel parameters; report the ones with a weight (BN, depthwise conv)."""
    index = plan.index
    changes = []
    for position, node in enumerate(index.nodes):
        role = plan.roles[position]
        if role.kind != "channel":
            continue
        keep = plan.keep(node.output[0])
        if keep is None:
            continue
        params = CHANNEL_OPS[role.channel_op].params
        before = edits.get(position, params[0]).shape if params else None
        for slot in params:
            if len(node.input) > slot and node.input[slot]:
                edits.set(position, slot, np.take(edits.get(position, slot), keep, axis=0))
        if params:
            size = plan.space.size[node.output[0]]
            removed = np.setdiff1d(np.arange(size), keep)
            changes.append(LayerChange(
                node=index.node_name(position), weight=node.input[params[0]], shape_before=tuple(before),
                shape_after=tuple(edits.get(position, params[0]).shape), out_units=size, in_units=size,
                removed_out=removed, removed_in=removed, folded=False,
            ))
        if role.channel_op == "DepthwiseConv":
            _set_attribute(graph.node[position], "group", len(keep))
        if node.op_type == "Resize" and len(node.input) > 3 and node.input[3]:
            sizes = edits.get(position, 3).copy()
            sizes[plan.space.axis[node.output[0]]] = len(keep)
            edits.set(position, 3, sizes)
        if node.op_type == "Expand":
            # The target shape lines up with the output from the right; a 1 there broadcasts.
            target = edits.get(position, 1).copy()
            slot = plan.space.axis[node.output[0]] - (index.rank(node.output[0]) - len(target))
            if slot >= 0 and target[slot] == plan.space.size[node.output[0]]:
                target[slot] = len(keep)
                edits.set(position, 1, target)
    return changes


def _rewrite_selections(plan: Plan, edits: _Edits, graph) -> None:
    """Recompute Split sizes and Slice bounds from the kept channels."""
    index = plan.index
    for position, node in enumerate(index.nodes):
        if plan.roles[position].kind not in ("split", "slice") or not plan.space.has(node.input[0]):
            continue
        picked = selections(index, node, plan.space)
        source = node.input[0]
        if not picked or (plan.keep(source) is None and all(plan.keep(name) is None for name, _ in picked)):
            continue
        size = plan.space.size[source]
        kept = plan.keep(source) if plan.keep(source) is not None else np.arange(size)
        position_of = np.full(size, -1, dtype=np.int64)
        position_of[kept] = np.arange(len(kept))

        if node.op_type == "Split":
            sizes = [len(plan.keep(name)) if plan.keep(name) is not None else len(sel) for name, sel in picked]
            _write_split_sizes(plan, edits, graph.node[position], position, sizes)
            continue

        name, selected = picked[0]
        new_positions = position_of[_take(selected, plan.keep(name), 0)]
        assert (new_positions >= 0).all(), "a selected channel was removed without its output"
        spec = slice_spec(node, index)
        axis = plan.space.axis[source]
        bounds = rewrite_slice(spec, axis, size, new_positions, len(kept))
        if bounds is None:
            _slice_to_gather(graph.node[position], edits, new_positions, axis)
        else:
            _write_slice_bounds(index, edits, graph.node[position], position, spec.axes.index(axis), bounds)


def _write_split_sizes(plan: Plan, edits: _Edits, node, position: int, sizes: list[int]) -> None:
    if plan.index.opset < 13:
        _set_attribute(node, "split", sizes)
    elif len(node.input) > 1 and node.input[1]:
        edits.set(position, 1, np.array(sizes, dtype=np.int64))
    else:
        # An equal split by output count (or opset 18's num_outputs) becomes explicit sizes.
        for attr in list(node.attribute):
            if attr.name == "num_outputs":
                node.attribute.remove(attr)
        name = edits.add_initializer(f"{node.name}_split", np.array(sizes, dtype=np.int64))
        if len(node.input) > 1:
            node.input[1] = name
        else:
            node.input.append(name)


def _write_slice_bounds(index, edits: _Edits, node, position: int, i: int, bounds: tuple[int, int, int]) -> None:
    start, end, step = bounds
    if index.opset < 10:
        for key, value in (("starts", start), ("ends", end)):
            values = list(next(a for a in node.attribute if a.name == key).ints)
            values[i] = value
            _set_attribute(node, key, values)
        return
    for slot, value in ((1, start), (2, end), (4, step)):
        if len(node.input) > slot and node.input[slot]:
            array = edits.get(position, slot).copy()
            array[i] = value
            edits.set(position, slot, array)


def _slice_to_gather(node, edits: _Edits, positions: np.ndarray, axis: int) -> None:
    """Replace a Slice whose kept channels no longer have a common step by a Gather."""
    data = node.input[0]
    indices = edits.add_initializer(f"{node.name}_indices", positions.astype(np.int64))
    del node.input[:]
    node.input.extend([data, indices])
    del node.attribute[:]
    node.op_type = "Gather"
    node.attribute.append(helper.make_attribute("axis", axis))


def _rewrite_reshape_targets(plan: Plan, edits: _Edits) -> None:
    index = plan.index
    for position, node in enumerate(index.nodes):
        if node.op_type != "Reshape" or plan.roles[position].kind != "shape":
            continue
        output = node.output[0]
        if plan.keep(output) is None or output in plan.gather_inputs:
            continue  # unchanged, or its used features are picked by a Gather after it
        target = edits.get(position, 1).copy()
        axis = plan.space.axis[output]
        if target[axis] > 0:
            target[axis] = len(plan.keep(output))
            edits.set(position, 1, target)


def _rewrite_gather_indices(plan: Plan, edits: _Edits) -> None:
    index = plan.index
    for position, node in enumerate(index.nodes):
        if plan.roles[position].kind != "gather":
            continue
        source, output = node.input[0], node.output[0]
        if not plan.space.has(source) or gather_axis(index, node) != plan.space.axis[source]:
            continue
        keep_in, keep_out = plan.keep(source), plan.keep(output)
        if keep_in is None and keep_out is None:
            continue
        indices = edits.get(position, 1).astype(np.int64) % plan.space.size[source]
        indices = _take(indices, keep_out, 0)
        if keep_in is not None:
            # Input units kept by the plan get new positions 0..len(keep_in)-1.
            position_of = np.full(plan.space.size[source], -1, dtype=np.int64)
            position_of[keep_in] = np.arange(len(keep_in))
            indices = position_of[indices]
            assert (indices >= 0).all(), "a selected input unit was removed without its output"
        edits.set(position, 1, indices.astype(edits.get(position, 1).dtype))


def _apply_edits(model: onnx.ModelProto, edits: _Edits) -> None:
    graph = model.graph
    index = edits.index
    by_name: dict[str, list[tuple[int, int, np.ndarray]]] = {}
    for (node, slot), array in edits.values.items():
        by_name.setdefault(graph.node[node].input[slot], []).append((node, slot, array))

    initializers = {t.name: t for t in graph.initializer}

    for name, uses in by_name.items():
        original = index.array(name)
        all_uses = {(use.node, use.slot) for use in index.uses(name)}
        changed = [(n, s, a) for n, s, a in uses if a.shape != original.shape or not np.array_equal(a, original)]
        if not changed:
            continue
        distinct = {(a.shape, a.tobytes()) for _, _, a in changed}
        if len(distinct) == 1 and {(n, s) for n, s, _ in changed} == all_uses:
            _replace_initializer(graph, initializers[name], changed[0][2])
            continue
        # A shared initializer read differently: one copy per distinct new value.
        copies: dict[tuple, str] = {}
        for node, slot, array in changed:
            key = (array.shape, array.tobytes())
            if key not in copies:
                copies[key] = edits.unique(f"{name}_{graph.node[node].name}")
                tensor = numpy_helper.from_array(array, copies[key])
                graph.initializer.append(tensor)
                if model.ir_version < 4:
                    graph.input.append(helper.make_tensor_value_info(copies[key], tensor.data_type, array.shape))
            graph.node[node].input[slot] = copies[key]


def _replace_initializer(graph, tensor: onnx.TensorProto, array: np.ndarray) -> None:
    tensor.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(tensor).dtype), tensor.name))
    for value in graph.input:
        if value.name == tensor.name:
            value.CopyFrom(helper.make_tensor_value_info(tensor.name, tensor.data_type, array.shape))


def _gather_input(plan: Plan, name: str, edits: _Edits, graph) -> onnx.NodeProto:
    """Route the used features of ``name`` through a Gather and point its readers at it."""
    keep = plan.keep(name)
    indices = edits.unique(f"{name}_used_features")
    gathered = edits.unique(f"{name}_used")
    graph.initializer.append(numpy_helper.from_array(keep.astype(np.int64), indices))
    for node in graph.node:
        for slot, input_name in enumerate(node.input):
            if input_name == name:
                node.input[slot] = gathered
    axis = plan.space.axis[name]
    return helper.make_node("Gather", [name, indices], [gathered], axis=axis, name=edits.unique(f"{name}_gather"))


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    listed = {i.name for i in graph.input}
    kept = [t for t in graph.initializer if t.name in used or t.name in listed]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _set_input(node: onnx.NodeProto, slot: int, name: str) -> None:
    """Fill an optional input slot, which may be absent or present as an empty name."""
    while len(node.input) <= slot:
        node.input.append("")
    node.input[slot] = name


def _set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.CopyFrom(helper.make_attribute(name, value))
            return
    node.attribute.append(helper.make_attribute(name, value))
