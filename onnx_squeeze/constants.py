"""Forward pass: which units hold a known constant for every input, and its value.

A weight op's output unit is known when every input unit its row reads is known
(``z_o = sum_j W[o, j] c_j + b_o``); a conv that pads its input, or a ConvTranspose, also
needs those constants to be exactly zero. Element-wise and channel-wise ops map constants
through their tables; Flatten, Concat, Split, Slice and Gather copy them to the positions
they move to. Every value is rounded to its tensor's element type after each op, as the
runtime stores it. A value that is NaN or infinite counts as unknown, so such a unit is never
folded.
"""

from __future__ import annotations

import numpy as np
import onnx

from .channelwise import CHANNEL_OPS
from .graph import GraphIndex
from .index_ops import selections
from .layers import Layer
from .ops import BINARY_OPS, UNARY_OPS, clip_bounds
from .units import NodeRole, UnitSpace, aligned_axis, gather_axis


_ROUNDING = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
}


def _round_to_type(values: np.ndarray, elem_type: int | None) -> np.ndarray:
    """Round to the tensor's element type, as the runtime stores it (a Cast to float16 included)."""
    dtype = _ROUNDING.get(elem_type)
    if dtype is None:
        return values
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(values, dtype=np.float64).astype(dtype).astype(np.float64)


def constant_per_unit(index: GraphIndex, name: str, output: str, out_axis: int, size: int) -> np.ndarray | None:
    """Return a per-unit view of a constant operand, or None if it varies along other axes."""
    array = index.array(name).astype(np.float64)
    axis = aligned_axis(index, name, output, out_axis)
    if axis is None or array.shape[axis] == 1:
        flat = array.reshape(-1)
        return np.full(size, flat[0]) if np.all(flat == flat[0]) else None
    moved = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
    if not np.all(moved == moved[:, :1]):
        return None
    return moved[:, 0].copy()


def propagate_constants(index: GraphIndex, roles: list[NodeRole], space: UnitSpace) -> tuple[np.ndarray, np.ndarray]:
    """Forward pass: which units hold a known constant for every input, and its value."""
    known = np.zeros(space.total, dtype=bool)
    value = np.zeros(space.total, dtype=np.float64)

    with np.errstate(all="ignore"):
        for position, node in enumerate(index.nodes):
            role = roles[position]
            output = node.output[0] if node.output else ""
            if not space.has(output):
                continue
            out_ids = space.ids(output)

            if role.kind == "layer":
                k, v = _layer_constants(index, role.layer, space, known, value)
            elif role.kind in ("unary", "binary"):
                k, v = _elementwise_constants(index, node, space, known, value)
            elif role.kind == "shape" and space.has(node.input[0]):
                k, v = _mapped_constants(space, node.input[0], output, known, value)
            elif role.kind == "concat":
                k, v = _concat_constants(index, node, space, known, value)
            elif role.kind == "channel" and space.has(node.input[0]):
                ids = space.ids(node.input[0])
                if len(ids) != len(out_ids):
                    continue
                k, v = CHANNEL_OPS[role.channel_op].constant(known[ids], value[ids], node, index)
            elif role.kind in ("split", "slice"):
                picked = selections(index, node, space) if space.has(node.input[0]) else None
                if picked is None:
                    continue
                ids = space.ids(node.input[0])
                pairs = picked or [(name, np.arange(len(ids))) for name in node.output if name]
                for name, selected in pairs:
                    if space.has(name) and len(selected) == space.size[name]:
                        known[space.ids(name)] = known[ids[selected]]
                        value[space.ids(name)] = value[ids[selected]]
                continue
            elif role.kind == "gather" and space.has(node.input[0]):
                ids = space.ids(node.input[0])
                if gather_axis(index, node) == space.axis[node.input[0]]:
                    ids = ids[index.array(node.input[1]).astype(np.int64) % len(ids)]
                k, v = known[ids], value[ids]
            else:
                continue
            if k is None:
                continue
            v = _round_to_type(v, index.elem_types.get(output))
            k = k & np.isfinite(v)
            known[out_ids] = k
            value[out_ids] = np.where(k, v, 0.0)
    return known, value


def _layer_constants(index, layer: Layer, space, known, value):
    if space.has(layer.input):
        ids = space.ids(layer.input)
        k = ~(layer.reads & ~known[ids][None, :]).any(axis=1)
        if not layer.absorbs_constants:
            # Padding or overlapping taps make a nonzero constant input vary over positions.
            k &= ~(layer.reads & (known[ids] & (value[ids] != 0))[None, :]).any(axis=1)
        v = layer.matrix @ np.where(known[ids], value[ids], 0.0)
    else:
        k = ~layer.reads.any(axis=1)
        v = np.zeros(layer.out_units)
    node = index.nodes[layer.node]
    has_bias = len(node.input) > 2 and node.input[2] != ""
    if has_bias and not layer.replace_bias:
        bias = index.array(node.input[2]).astype(np.float64).reshape(-1)
        v = v + layer.bias.divisor * np.broadcast_to(bias, v.shape)
    return k, v


def _elementwise_constants(index, node, space, known, value):
    output = node.output[0]
    out_axis, size = space.axis[output], space.size[output]
    operands = []
    for slot, name in enumerate(node.input):
        if not name or (node.op_type in UNARY_OPS and slot > 0):
            continue
        if index.is_constant(name):
            per_unit = constant_per_unit(index, name, output, out_axis, size)
            if per_unit is None:
                return None, None
            operands.append((np.ones(size, dtype=bool), per_unit))
        elif space.has(name) and space.size[name] == size:
            ids = space.ids(name)
            operands.append((known[ids], value[ids]))
        else:
            operands.append((np.zeros(size, dtype=bool), np.zeros(size)))

    if node.op_type in UNARY_OPS:
        k, v = operands[0]
        return k, UNARY_OPS[node.op_type](v, node, index)

    fn = BINARY_OPS[node.op_type]
    if node.op_type == "Where":
        (kc, vc), (kx, vx), (ky, vy) = operands
        # The output is known where the condition is known and the branch it picks is known.
        return kc & np.where(vc != 0, kx, ky), fn(vc, vx, vy)
    k, v = operands[0]
    for k2, v2 in operands[1:]:
        if node.op_type == "Mul":
            # A known zero times a bounded value (a sigmoid gate, a mask, a constant) is zero,
            # so a dead channel stays dead through it. An unbounded value may be inf, and
            # 0 * inf is NaN, so no such rule holds there.
            first_bounded, second_bounded = (_bounded(index, name) for name in node.input[:2])
            zero = (k & (v == 0) & second_bounded) | (k2 & (v2 == 0) & first_bounded)
            k, v = (k & k2) | zero, np.where(zero, 0.0, fn(v, v2))
        else:
            k, v = k & k2, fn(v, v2)
    return k, v


BOUNDED_OPS = {"Sigmoid", "HardSigmoid", "Tanh", "Softsign", "Erf", "Softmax", "Cos", "Sin"}


def _bounded(index: GraphIndex, name: str) -> bool:
    """Return True if ``name`` is a finite constant or the output of an op with a bounded range."""
    if index.is_constant(name):
        return bool(np.isfinite(index.array(name)).all())
    producer = index.producer.get(name)
    if producer is None:
        return False
    node = index.nodes[producer]
    if node.op_type == "Clip":
        try:
            low, high = clip_bounds(node, index)
        except KeyError:
            return False
        return bool(np.isfinite(low) and np.isfinite(high))
    return node.op_type in BOUNDED_OPS


def _mapped_constants(space, source, output, known, value):
    k = np.zeros(space.size[output], dtype=bool)
    v = np.zeros(space.size[output])
    src_ids = space.ids(source)
    out_ids = space.ids(output)
    # Units of the output are unioned with their source channel; copy through that link.
    roots = {space.find(int(u)): i for i, u in enumerate(src_ids)}
    for j, unit in enumerate(out_ids.tolist()):
        i = roots.get(space.find(unit))
        if i is not None:
            k[j], v[j] = known[src_ids[i]], value[src_ids[i]]
    return k, v


def _concat_constants(index, node, space, known, value):
    output = node.output[0]
    parts_k, parts_v = [], []
    for name in node.input:
        if not space.has(name):
            return None, None
        ids = space.ids(name)
        parts_k.append(known[ids])
        parts_v.append(value[ids])
    k, v = np.concatenate(parts_k), np.concatenate(parts_v)
    if len(k) != space.size[output]:
        return None, None  # concatenated along another axis
    return k, v
