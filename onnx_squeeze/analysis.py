"""Find the removable units of a model: coupling, constants, usage and the removal plan.

Notation: a weight op computes ``z = W x + b``; a consumer computes ``z' = V a + c``.

- R1 (dead unit): unit i whose row ``W[i, :]`` reads only units of known constant value
  carries a known constant itself. Element-wise ops map that constant (``act(b_i)``). A
  consumer absorbs it by ``c += V[:, i] * a_i``, after which column i can go.
- R2 (unused unit): unit i whose column ``V[:, i]`` is zero in every consumer is read by
  nobody and goes without folding.
- Coupling: units tied by an index-preserving op form one class, removed only if every
  member is dead or unused at each consumer that reads it.

The analysis never guesses. A unit class that touches a barrier (an op it does not
understand), a graph output, or a graph input (unless input pruning is on) is kept, and the
reason is recorded. Removal also never empties a tensor: when every unit of a tensor could
go, the lowest-index one is kept, so no zero-sized tensor appears (its constant or unused
value is then computed as before).

The result is a ``Plan``: the indices kept for every unit-bearing tensor and the constants
each consumer must absorb. ``rewrite.apply_plan`` carries it out; nothing here edits the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .channelwise import CHANNEL_OPS
from .graph import GraphIndex
from .index_ops import slice_selection, slice_spec, split_axis, split_sizes
from .layers import Layer, match_layer
from .ops import BINARY_OPS, UNARY_OPS
from .units import (
    NodeRole,
    UnitSpace,
    aligned_axis,
    assign_axes,
    block_map,
    build_units,
    classify_nodes,
    gather_axis,
    variable_inputs,
)

logger = logging.getLogger(__name__)


@dataclass
class Refusal:
    """A unit class kept for a reason other than being live; ``units`` counts its members."""

    reason: str
    tensors: list[str]
    units: int

    def as_dict(self) -> dict:
        return {"reason": self.reason, "tensors": self.tensors, "units": self.units}


@dataclass
class Plan:
    """What to remove: the outcome of one analysis round."""

    index: GraphIndex
    roles: list[NodeRole]
    space: UnitSpace
    known: np.ndarray
    value: np.ndarray
    removed: np.ndarray
    gather_inputs: list[str] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.removed.any())

    def keep(self, tensor: str) -> np.ndarray | None:
        """Return the kept indices of ``tensor``, or None if it keeps all of them."""
        if not self.space.has(tensor):
            return None
        mask = ~self.removed[self.space.ids(tensor)]
        return None if mask.all() else np.flatnonzero(mask)

    def layers(self) -> list[Layer]:
        return [role.layer for role in self.roles if role.kind == "layer"]

    def fold(self, layer: Layer) -> np.ndarray | None:
        """Return the constant the layer's output absorbs from its removed inputs, or None."""
        if not self.space.has(layer.input):
            return None
        ids = self.space.ids(layer.input)
        gone = self.removed[ids] & self.known[ids]
        if not gone.any():
            return None
        delta = layer.matrix[:, gone] @ self.value[ids][gone]
        return delta if np.any(delta != 0) else None


def analyze(index: GraphIndex, *, prune_inputs: bool = False) -> Plan:
    """Run one round of the analysis on a normalized model."""
    layers = {}
    for position in range(len(index.nodes)):
        matched = match_layer(index, position)
        if matched is not None:
            layers[position] = matched
    roles = classify_nodes(index, layers)
    space = build_units(index, assign_axes(index, roles))

    pins: dict[int, str] = {}
    gather_inputs = _couple(index, roles, space, pins, prune_inputs=prune_inputs)
    known, value = _propagate_constants(index, roles, space)
    removed, refusals = _decide(index, roles, space, pins, known, value)

    # A prunable input read only by Gathers on its channel axis keeps its shape: removing
    # its units means selecting fewer indices in those Gathers, which the rewrite does.
    inserts = []
    for name in gather_inputs:
        readers = [roles[use.node].kind == "gather" and use.slot == 0
                   and gather_axis(index, index.nodes[use.node]) == space.axis[name]
                   for use in index.uses(name)]
        if readers and all(readers):
            removed[space.ids(name)] = False
        else:
            inserts.append(name)

    plan = Plan(index, roles, space, known, value, removed, refusals=refusals)
    plan.gather_inputs = [name for name in inserts if plan.keep(name) is not None]
    return plan


def _pin(space: UnitSpace, pins: dict[int, str], tensor: str, reason: str) -> None:
    if space.has(tensor):
        for unit in space.ids(tensor).tolist():
            pins.setdefault(unit, reason)


def _couple(index: GraphIndex, roles: list[NodeRole], space: UnitSpace, pins: dict[int, str], *, prune_inputs: bool) -> list[str]:
    """Union index-preserving units and pin what must stay; return prunable graph inputs."""
    sources: set[str] = set()
    for position, node in enumerate(index.nodes):
        role = roles[position]
        where = f"node '{index.node_name(position)}' ({node.op_type})"
        if role.kind == "layer":
            layer = role.layer
            for tensor, size in ((layer.input, layer.in_units), (layer.output, layer.out_units)):
                if space.has(tensor) and space.size[tensor] != size:
                    _pin(space, pins, tensor, f"{where}: weight shape does not match '{tensor}'")
        elif role.kind in ("unary", "binary", "concat"):
            _couple_elementwise(index, node, space, pins, where)
        elif role.kind == "gather":
            _couple_gather(index, node, space, pins, where)
        elif role.kind in ("split", "slice"):
            _couple_selection(index, node, space, pins, where)
        elif role.kind == "channel":
            source, output = node.input[0], node.output[0]
            if space.has(source) and space.has(output) and space.size[source] == space.size[output]:
                space.union_many(space.ids(source), space.ids(output))
            else:
                _pin(space, pins, source, f"{where}: its channel axis cannot be followed")
                _pin(space, pins, output, f"{where}: its channel axis cannot be followed")
        elif role.kind == "shape":
            source, output = node.input[0], node.output[0]
            mapped = block_map(index, node, space.axis[source]) if space.has(source) else None
            if mapped and space.has(output):
                table = mapped[1]
                for channel, units in enumerate(table):
                    for unit in units.tolist():
                        space.union(space.offset[source] + channel, space.offset[output] + unit)
            else:
                _pin(space, pins, source, f"{where}: cannot map channels through this reshape")
                sources.add(output)
        else:
            for name in [*node.input, *node.output]:
                _pin(space, pins, name, f"{where}: {role.reason}")

    for name in index.graph_outputs:
        _pin(space, pins, name, f"'{name}' is a graph output")

    # A graph input, or a reshape of one, can lose unused features through a Gather.
    prunable = []
    for name in sorted(sources | set(index.graph_inputs)):
        producer = index.producer.get(name)
        from_input = name in index.graph_inputs or (
            producer is not None and index.nodes[producer].input[0] in index.graph_inputs
        )
        if prune_inputs and from_input and name not in index.graph_outputs:
            prunable.append(name)
        elif name in index.graph_inputs:
            _pin(space, pins, name, f"'{name}' is a graph input (use --prune-inputs to drop unused features)")
        elif from_input:
            _pin(space, pins, name, f"'{name}' is a reshape of a graph input (use --prune-inputs to drop unused features)")
        else:
            _pin(space, pins, name, f"'{name}' is computed by a reshape whose channels cannot be mapped")
    return prunable


def _couple_elementwise(index: GraphIndex, node, space: UnitSpace, pins: dict[int, str], where: str) -> None:
    output = node.output[0]
    inputs = variable_inputs(index, node)
    if node.op_type in UNARY_OPS:
        inputs = inputs[:1]

    if not space.has(output):
        for _, name in inputs:
            _pin(space, pins, name, f"{where}: output '{output}' has no channel axis")
        return

    out_axis = space.axis[output]
    if node.op_type == "Concat":
        _couple_concat(index, node, space, pins, where)
        return

    out_ids = space.ids(output)
    for _, name in inputs:
        axis = aligned_axis(index, name, output, out_axis)
        dim = None if axis is None else index.shapes[name][axis]
        if dim == 1 and space.size[output] != 1:
            continue  # broadcast along the channel axis: not coupled
        if space.has(name) and space.axis[name] == axis and space.size[name] == space.size[output]:
            space.union_many(space.ids(name), out_ids)
        else:
            _pin(space, pins, output, f"{where}: input '{name}' cannot follow the channel axis")
            _pin(space, pins, name, f"{where}: input '{name}' cannot follow the channel axis")

    if node.op_type in BINARY_OPS:
        for name in node.input:
            if index.is_constant(name) and not _constant_fits(index, name, output, out_axis, space.size[output]):
                _pin(space, pins, output, f"{where}: constant '{name}' does not broadcast per channel")


def selections(index: GraphIndex, node, space: UnitSpace) -> list[tuple[str, np.ndarray]] | None:
    """For Split and Slice on the channel axis: (output, selected input positions) pairs.

    Returns an empty list when the op does not cut the channel axis, and None when the
    selection cannot be followed (a Slice of the channel axis together with other axes).
    """
    source = node.input[0]
    axis, size = space.axis[source], space.size[source]
    if node.op_type == "Split":
        if split_axis(node, index) != axis:
            return []
        sizes = split_sizes(node, index, size)
        offsets = np.cumsum([0, *sizes])
        return [(name, np.arange(offsets[i], offsets[i + 1])) for i, name in enumerate(node.output) if name]
    spec = slice_spec(node, index)
    selected = slice_selection(spec, axis, size)
    if selected is None:
        return []
    if len(spec.axes) > 1:
        return None
    return [(node.output[0], selected)]


def _couple_selection(index: GraphIndex, node, space: UnitSpace, pins: dict[int, str], where: str) -> None:
    source = node.input[0]
    outputs = [name for name in node.output if name]
    if not space.has(source) or not all(space.has(name) for name in outputs):
        for name in [source, *outputs]:
            _pin(space, pins, name, f"{where}: its channel axis cannot be followed")
        return
    picked = selections(index, node, space)
    if picked is None:
        for name in [source, *outputs]:
            _pin(space, pins, name, f"{where}: slices the channel axis together with other axes")
        return
    if not picked:
        for name in outputs:
            space.union_many(space.ids(source), space.ids(name))
        return
    for name, selected in picked:
        space.union_many(space.ids(source)[selected], space.ids(name))


def _couple_gather(index: GraphIndex, node, space: UnitSpace, pins: dict[int, str], where: str) -> None:
    source, output = node.input[0], node.output[0]
    if not (space.has(source) and space.has(output)):
        _pin(space, pins, source, f"{where}: output '{output}' has no channel axis")
        _pin(space, pins, output, f"{where}: input '{source}' has no channel axis")
        return
    if gather_axis(index, node) != space.axis[source]:
        space.union_many(space.ids(source), space.ids(output))
        return
    # Output unit k is input unit indices[k]; input units not selected are not read here.
    selected = index.array(node.input[1]).astype(np.int64) % space.size[source]
    space.union_many(space.ids(source)[selected], space.ids(output))


def _constant_fits(index: GraphIndex, name: str, output: str, out_axis: int, size: int) -> bool:
    shape = index.shapes[name]
    axis = aligned_axis(index, name, output, out_axis)
    if len(shape) > (index.rank(output) or 0):
        return False
    return axis is None or shape[axis] in (1, size)


def _couple_concat(index: GraphIndex, node, space: UnitSpace, pins: dict[int, str], where: str) -> None:
    output = node.output[0]
    out_axis = space.axis[output]
    rank = index.rank(output)
    concat_axis = int(next((a.i for a in node.attribute if a.name == "axis"), 0))
    concat_axis = concat_axis + rank if concat_axis < 0 else concat_axis

    offset = 0
    for name in node.input:
        if not space.has(name) or space.axis[name] != out_axis or index.is_constant(name):
            _pin(space, pins, output, f"{where}: input '{name}' cannot follow the channel axis")
            _pin(space, pins, name, f"{where}: input '{name}' cannot follow the channel axis")
            return
        ids = space.ids(name)
        if concat_axis == out_axis:
            space.union_many(ids, space.ids(output)[offset:offset + len(ids)])
            offset += len(ids)
        else:
            space.union_many(ids, space.ids(output))


def _constant_per_unit(index: GraphIndex, name: str, output: str, out_axis: int, size: int) -> np.ndarray | None:
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


def _propagate_constants(index: GraphIndex, roles: list[NodeRole], space: UnitSpace) -> tuple[np.ndarray, np.ndarray]:
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
            per_unit = _constant_per_unit(index, name, output, out_axis, size)
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
            # A known zero times any finite value is zero, so a dead channel stays dead
            # through a gate or a mask.
            zero = (k & (v == 0)) | (k2 & (v2 == 0))
            k, v = (k & k2) | zero, np.where(zero, 0.0, fn(v, v2))
        else:
            k, v = k & k2, fn(v, v2)
    return k, v


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


def _decide(index, roles, space, pins, known, value) -> tuple[np.ndarray, list[Refusal]]:
    """Choose the removed units: fixed point of R1/R2 over classes, then the zero-width guard."""
    roots = space.roots()
    pinned_root = np.zeros(space.total, dtype=bool)
    pin_reason: dict[int, str] = {}
    for unit, reason in pins.items():
        pinned_root[roots[unit]] = True
        pin_reason.setdefault(int(roots[unit]), reason)

    layers = [role.layer for role in roles if role.kind == "layer"]
    removed = np.zeros(space.total, dtype=bool)
    while True:
        live_root = np.zeros(space.total, dtype=bool)
        padded_root = np.zeros(space.total, dtype=bool)
        pad_reason: dict[int, str] = {}
        for layer in layers:
            if not space.has(layer.input):
                continue
            ids = space.ids(layer.input)
            reads = layer.reads
            if space.has(layer.output):
                reads = reads[~removed[space.ids(layer.output)]]
            read = reads.any(axis=0)
            live_root[roots[ids[read & ~known[ids]]]] = True
            if not layer.absorbs_constants:
                # A nonzero constant meets zero padding (or uneven overlap) in this layer.
                blocked = ids[read & known[ids] & (value[ids] != 0)]
                padded_root[roots[blocked]] = True
                for unit in blocked.tolist():
                    pad_reason.setdefault(
                        int(roots[unit]),
                        f"node '{layer.name}' ({layer.op_type}) pads its input, so the constant "
                        f"{value[unit]:.6g} cannot be folded into its bias exactly",
                    )
        needed_root = live_root | padded_root
        candidate = ~pinned_root[roots] & ~needed_root[roots]
        if np.array_equal(candidate, removed):
            break
        # More removed rows can only free more columns, so the set only grows.
        assert not (removed & ~candidate).any()
        removed = candidate

    removed = _keep_one_per_tensor(space, roots, removed)

    # Report classes kept only because of a rule (a barrier, a graph input or output, zero
    # padding), grouped by reason. An output unit that is not constant is simply live.
    reasons = {root: reason for root, reason in pad_reason.items() if not live_root[root] and not pinned_root[root]}
    for root, reason in pin_reason.items():
        if not needed_root[root]:
            reasons[root] = reason
    return removed, _refusals(space, roots, known, reasons)


def _refusals(space: UnitSpace, roots: np.ndarray, known: np.ndarray, reasons: dict[int, str]) -> list[Refusal]:
    names = list(space.offset)
    unit_tensor = np.zeros(space.total, dtype=np.int64)
    for position, name in enumerate(names):
        unit_tensor[space.ids(name)] = position

    units = np.flatnonzero(np.isin(roots, np.fromiter(reasons, dtype=np.int64, count=len(reasons))))
    units = units[np.argsort(roots[units], kind="stable")]
    by_reason: dict[str, Refusal] = {}
    for members in np.split(units, np.flatnonzero(np.diff(roots[units])) + 1):
        if not len(members):
            continue
        reason = reasons[int(roots[members[0]])]
        if reason.endswith("is a graph output") and not known[members].any():
            continue
        refusal = by_reason.setdefault(reason, Refusal(reason, [], 0))
        refusal.units += len(members)
        refusal.tensors = sorted(set(refusal.tensors) | {names[i] for i in np.unique(unit_tensor[members])})
    return list(by_reason.values())


def _keep_one_per_tensor(space: UnitSpace, roots: np.ndarray, removed: np.ndarray) -> np.ndarray:
    removed = removed.copy()
    changed = True
    while changed:
        changed = False
        for tensor in space.offset:
            ids = space.ids(tensor)
            if removed[ids].all():
                logger.debug("every unit of '%s' is removable; keeping unit 0 so it does not become empty", tensor)
                removed[roots == roots[ids[0]]] = False
                changed = True
    return removed
