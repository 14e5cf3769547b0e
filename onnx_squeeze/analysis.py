"""Find the removable units of a model: coupling, constants, usage and the removal plan.

Notation: a weight op computes ``z = W x + b``; a consumer computes ``z' = V a + c``.

- R1 (dead unit): unit i whose row ``W[i, :]`` reads only units of known constant value
  carries a known constant itself. Element-wise ops map that constant (``act(b_i)``). A
  consumer absorbs it by ``c += V[:, i] * a_i``, after which column i can go.
- R2 (unused unit): unit i whose column ``V[:, i]`` is zero in every consumer is read by
  no consumer and goes without folding.
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

from .constants import propagate_constants
from .graph import GraphIndex
from .index_ops import selections
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
    """Unit classes kept for one reason other than being live; ``units`` counts the classes."""

    reason: str
    tensors: list[str]
    units: int

    def as_dict(self) -> dict:
        return {"reason": self.reason, "tensors": self.tensors, "units": self.units}


@dataclass
class Plan:
    """The removal plan of one analysis round: kept indices and the constants to fold."""

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

    def removed_classes(self) -> int:
        """Return how many coupled unit classes (channels, neurons) this round removes."""
        return len(np.unique(self.space.roots()[self.removed]))

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
    known, value = propagate_constants(index, roles, space)
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

    # An If/Loop/Scan body may read any outer tensor by name; its units must all stay.
    for name, uses in index.consumers.items():
        for use in uses:
            if use.slot == -1:
                _pin(space, pins, name, f"'{name}' is read inside the body of node '{index.node_name(use.node)}'")

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

    removed = _keep_groups_equal(layers, space, roots, removed)

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
        refusal.units += 1
        refusal.tensors = sorted(set(refusal.tensors) | {names[i] for i in np.unique(unit_tensor[members])})
    return list(by_reason.values())


def _keep_groups_equal(layers: list[Layer], space: UnitSpace, roots: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Apply the zero-width guard, and keep every unit of a grouped conv whose groups would
    end up with different sizes. Both only keep more units, so the loop ends."""
    removed = _keep_one_per_tensor(space, roots, removed)
    grouped = [layer for layer in layers if layer.groups > 1]
    changed = True
    while changed:
        changed = False
        for layer in grouped:
            for tensor in (layer.input, layer.output):
                if not space.has(tensor):
                    continue
                ids = space.ids(tensor)
                counts = removed[ids].reshape(layer.groups, -1).sum(axis=1)
                if (counts != counts[0]).any():
                    logger.debug("keeping '%s': removal would leave the groups of '%s' unequal", tensor, layer.name)
                    removed[np.isin(roots, roots[ids])] = False
                    changed = True
        if changed:
            removed = _keep_one_per_tensor(space, roots, removed)
    return removed


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
