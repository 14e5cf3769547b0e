"""Unit spaces: which tensors carry units, on which axis, and which units are coupled.

A *unit* is one index along the channel axis of a tensor (a neuron of a Linear layer's output,
say). Every tensor whose channel axis is known and static gets a contiguous range of global
unit ids. Ops that preserve indices (element-wise ops, Concat, Flatten into a Linear) tie units
of their inputs and outputs together in a union-find structure. Each resulting class is
removed whole or kept whole.

The channel axis of each tensor is found by propagation: weight ops fix the axis of the
tensors they read and write, and index-preserving ops pass it on in both directions. A tensor
that would get two different axes keeps none, and ops around it become barriers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .graph import GraphIndex, attribute, static_dims
from .layers import Layer
from .channelwise import CHANNEL_OPS, channel_op_key, in_axis_for
from .index_ops import slice_check, split_check
from .ops import BINARY_OPS, UNARY_OPS, unary_reason

logger = logging.getLogger(__name__)

SHAPE_OPS = {"Flatten", "Reshape"}


@dataclass
class NodeRole:
    """The treatment of one node in the analysis; ``kind`` names it (layer, unary, channel, ...)."""

    kind: str
    reason: str = ""
    layer: Layer | None = None
    channel_op: str = ""


@dataclass
class UnitSpace:
    """Global unit ids of every unit-bearing tensor, and a union-find over them."""

    axis: dict[str, int] = field(default_factory=dict)
    offset: dict[str, int] = field(default_factory=dict)
    size: dict[str, int] = field(default_factory=dict)
    parent: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def total(self) -> int:
        return len(self.parent)

    def has(self, tensor: str) -> bool:
        return tensor in self.offset

    def ids(self, tensor: str) -> np.ndarray:
        start = self.offset[tensor]
        return np.arange(start, start + self.size[tensor])

    def find(self, unit: int) -> int:
        root = unit
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[unit] != root:
            self.parent[unit], unit = root, self.parent[unit]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_many(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.union(x, y)

    def roots(self) -> np.ndarray:
        return np.array([self.find(u) for u in range(self.total)], dtype=np.int64)


def classify_nodes(index: GraphIndex, layers: dict[int, Layer | str]) -> list[NodeRole]:
    """Give every node a role; ``layers`` maps node positions to matched layers or refusals."""
    roles = []
    for position, node in enumerate(index.nodes):
        matched = layers.get(position)
        if isinstance(matched, Layer):
            roles.append(NodeRole("layer", layer=matched))
        elif isinstance(matched, str):
            roles.append(NodeRole("barrier", matched))
        elif node.domain not in ("", "ai.onnx"):
            roles.append(NodeRole("barrier", f"custom-domain op {node.domain}::{node.op_type}"))
        elif channel_op_key(node, index):
            key = channel_op_key(node, index)
            reason = CHANNEL_OPS[key].check(node, index)
            roles.append(NodeRole("barrier", reason) if reason else NodeRole("channel", channel_op=key))
        elif node.op_type in UNARY_OPS:
            reason = unary_reason(node, index)
            roles.append(NodeRole("barrier", reason) if reason else NodeRole("unary"))
        elif node.op_type in BINARY_OPS:
            roles.append(NodeRole("binary"))
        elif node.op_type in SHAPE_OPS:
            if node.op_type == "Reshape" and not index.is_constant(node.input[1]):
                roles.append(NodeRole("barrier", "Reshape with a shape computed at run time"))
            else:
                roles.append(NodeRole("shape"))
        elif node.op_type == "Concat":
            roles.append(NodeRole("concat"))
        elif node.op_type in ("Split", "Slice"):
            reason = split_check(node, index) if node.op_type == "Split" else slice_check(node, index)
            roles.append(NodeRole("barrier", reason) if reason else NodeRole(node.op_type.lower()))
        elif node.op_type == "Gather":
            indices = node.input[1]
            if index.is_constant(indices) and index.array(indices).ndim == 1:
                roles.append(NodeRole("gather"))
            else:
                roles.append(NodeRole("barrier", "Gather without constant 1-D indices"))
        elif node.op_type in ("Shape", "Size"):
            roles.append(NodeRole("barrier", f"{node.op_type} reads the channel count, which a removal would change"))
        else:
            roles.append(NodeRole("barrier", f"{node.op_type} is not supported"))
    return roles


def variable_inputs(index: GraphIndex, node) -> list[tuple[int, str]]:
    return [(slot, name) for slot, name in enumerate(node.input) if name and not index.is_constant(name)]


def aligned_axis(index: GraphIndex, tensor: str, output: str, output_axis: int) -> int | None:
    """Return the axis of ``tensor`` that numpy broadcasting lines up with ``output_axis``."""
    rank, out_rank = index.rank(tensor), index.rank(output)
    if rank is None or out_rank is None:
        return None
    axis = output_axis - (out_rank - rank)
    return axis if axis >= 0 else None


def assign_axes(index: GraphIndex, roles: list[NodeRole]) -> dict[str, int]:
    """Propagate channel axes from weight ops through index-preserving ops to a fixed point."""
    axes: dict[str, int] = {}
    conflicts: set[str] = set()

    def put(tensor: str, axis: int | None) -> bool:
        if axis is None or tensor in conflicts or index.is_constant(tensor):
            return False
        if tensor in axes:
            if axes[tensor] != axis:
                logger.debug("tensor %s has two channel axes (%d and %d); keeping it whole", tensor, axes[tensor], axis)
                conflicts.add(tensor)
                del axes[tensor]
            return False
        axes[tensor] = axis
        return True

    for role in roles:
        if role.kind == "layer":
            put(role.layer.input, role.layer.input_axis)
            put(role.layer.output, role.layer.output_axis)

    changed = True
    while changed:
        changed = False
        for position, node in enumerate(index.nodes):
            role = roles[position]
            if role.kind in ("unary", "binary", "concat"):
                changed |= _propagate_elementwise(index, node, axes, put)
            elif role.kind == "shape":
                changed |= _propagate_shape(index, node, axes, put)
            elif role.kind == "channel":
                op = CHANNEL_OPS[role.channel_op]
                source, output = node.input[0], node.output[0]
                if source in axes:
                    changed |= put(output, op.out_axis(node, index, axes[source]))
                if output in axes:
                    changed |= put(source, in_axis_for(op, node, index, axes[output]))
            elif role.kind in ("split", "slice"):
                # Both keep the rank, so the channel axis keeps its position.
                source = node.input[0]
                outputs = [name for name in node.output if name]
                if source in axes:
                    for output in outputs:
                        changed |= put(output, axes[source])
                for output in outputs:
                    if output in axes:
                        changed |= put(source, axes[output])
            elif role.kind == "gather":
                # 1-D indices keep the rank, so the channel axis keeps its position.
                source, output = node.input[0], node.output[0]
                if source in axes:
                    changed |= put(output, axes[source])
                if output in axes:
                    changed |= put(source, axes[output])
    return axes


def _propagate_elementwise(index, node, axes, put) -> bool:
    output = node.output[0]
    inputs = variable_inputs(index, node)
    if node.op_type in UNARY_OPS:
        inputs = inputs[:1]
    changed = False
    if output in axes:
        for _, name in inputs:
            axis = aligned_axis(index, name, output, axes[output])
            if axis is not None and _dim(index, name, axis) == _dim(index, output, axes[output]):
                changed |= put(name, axis)
    for _, name in inputs:
        if name in axes:
            out_rank, rank = index.rank(output), index.rank(name)
            if out_rank is not None and rank is not None:
                axis = axes[name] + out_rank - rank
                if _dim(index, name, axes[name]) == _dim(index, output, axis):
                    changed |= put(output, axis)
    return changed


def _dim(index: GraphIndex, tensor: str, axis: int):
    shape = index.shapes.get(tensor)
    return None if shape is None or axis >= len(shape) else shape[axis]


def block_map(index: GraphIndex, node, in_axis: int) -> tuple[int, np.ndarray] | None:
    """Map a Flatten/Reshape input unit to output units: returns (output axis, table).

    ``table[c]`` lists the output units fed by input unit ``c``. The op must keep every dim
    before some position ``p <= in_axis`` and merge all dims from ``p`` on into the last
    output dim, which holds channel c at positions ``q*C*S + c*S + k`` (S = size of the dims
    after the channel axis, q indexes the merged dims before it).
    """
    in_shape, out_shape = index.shapes.get(node.input[0]), index.shapes.get(node.output[0])
    if in_shape is None or out_shape is None:
        return None
    if node.op_type == "Flatten":
        start = attribute(node, "axis", 1)
        start = start + len(in_shape) if start < 0 else start
    else:
        start = len(out_shape) - 1
        if not all(_same_dim(a, b) for a, b in zip(in_shape[:start], out_shape[:start])):
            return None
    if start > in_axis:
        return None
    tail = static_dims(in_shape[start:])
    if tail is None or _dim(index, node.output[0], len(out_shape) - 1) != int(np.prod(tail)):
        return None
    if node.op_type == "Flatten" and len(out_shape) != 2:
        return None

    local = in_axis - start
    before = int(np.prod(tail[:local]))
    channels = tail[local]
    after = int(np.prod(tail[local + 1:]))
    table = np.array(
        [[q * channels * after + c * after + k for q in range(before) for k in range(after)] for c in range(channels)],
        dtype=np.int64,
    )
    return len(out_shape) - 1, table


def _same_dim(a, b) -> bool:
    # Shape inference names the batch dim of a Reshape output anew (for example "unk__0"),
    # so two symbolic dims count as equal here; the static tail checked by the caller
    # must still match exactly.
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return True


def _propagate_shape(index, node, axes, put) -> bool:
    source = node.input[0]
    if source not in axes:
        return False
    mapped = block_map(index, node, axes[source])
    return put(node.output[0], mapped[0]) if mapped else False


def gather_axis(index: GraphIndex, node) -> int:
    rank = index.rank(node.input[0]) or 0
    axis = attribute(node, "axis", 0)
    return axis + rank if axis < 0 else axis


def build_units(index: GraphIndex, axes: dict[str, int]) -> UnitSpace:
    space = UnitSpace()
    total = 0
    for tensor in sorted(axes):
        size = _dim(index, tensor, axes[tensor])
        if not isinstance(size, int) or size <= 0:
            continue
        space.axis[tensor] = axes[tensor]
        space.offset[tensor] = total
        space.size[tensor] = size
        total += size
    space.parent = np.arange(total, dtype=np.int64)
    return space
