"""A read-only index over an ONNX graph: producers, consumers, initializers and shapes.

The analysis asks the same questions many times (who produces this tensor, which nodes read
it, is this input a constant, what rank does it have); ``GraphIndex`` answers them from
dictionaries built once per model. It never modifies the model it indexes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}

Dim = int | str | None


@dataclass(frozen=True)
class Use:
    """One input slot of one node that reads a tensor."""

    node: int
    slot: int


class GraphIndex:
    """Lookup tables over ``model.graph``; node positions are indices into ``graph.node``."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.nodes = list(model.graph.node)
        self.opset = default_opset(model)

        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self.graph_inputs = [i.name for i in self.graph.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in self.graph.output]

        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[Use]] = {}
        for index, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = index
            for slot, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append(Use(index, slot))

        # Tensors that If/Loop/Scan bodies read from the outer scope count as used by the
        # node that owns the body, in slot -1.
        for index, node in enumerate(self.nodes):
            for name in sorted(body_reads(node)):
                self.consumers.setdefault(name, []).append(Use(index, -1))

        self.shapes: dict[str, tuple[Dim, ...] | None] = {}
        self.elem_types: dict[str, int] = {}
        for value in [*self.graph.input, *self.graph.output, *self.graph.value_info]:
            self._record_value_info(value)
        for name, tensor in self.initializers.items():
            self.shapes[name] = tuple(int(d) for d in tensor.dims)
            self.elem_types[name] = tensor.data_type

    def _record_value_info(self, value: onnx.ValueInfoProto) -> None:
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            return
        self.elem_types[value.name] = tensor_type.elem_type
        if not tensor_type.HasField("shape"):
            self.shapes.setdefault(value.name, None)
            return
        dims: list[Dim] = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param"):
                dims.append(dim.dim_param)
            else:
                dims.append(None)
        self.shapes[value.name] = tuple(dims)

    def is_constant(self, name: str) -> bool:
        return name in self.initializers

    def array(self, name: str) -> np.ndarray:
        """Return the value of an initializer as a read-only numpy array."""
        if name not in self._arrays:
            array = numpy_helper.to_array(self.initializers[name])
            array.setflags(write=False)
            self._arrays[name] = array
        return self._arrays[name]

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def node_name(self, index: int) -> str:
        node = self.nodes[index]
        return node.name or f"{node.op_type}#{index}"

    def uses(self, name: str) -> list[Use]:
        return self.consumers.get(name, [])


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise AssertionError("a checked model always imports the default ONNX domain")


def attribute(node: onnx.NodeProto, name: str, default=None):
    """Return the value of a node attribute, or ``default`` when it is absent."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def static_dims(shape: tuple[Dim, ...] | None) -> tuple[int, ...] | None:
    """Return ``shape`` if every dim is a known integer, else None."""
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return tuple(shape)


def _bodies(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def body_reads(node: onnx.NodeProto) -> set[str]:
    """Return every tensor name read inside the bodies of ``node`` (If, Loop, Scan)."""
    names: set[str] = set()
    for attr in node.attribute:
        for body in _bodies(attr):
            names.update(name for inner in body.node for name in inner.input if name)
            names.update(subgraph_references(body))
    return names


def subgraph_references(graph: onnx.GraphProto) -> set[str]:
    """Return every tensor name that the node bodies nested in ``graph`` read."""
    names: set[str] = set()
    for node in graph.node:
        names.update(body_reads(node))
    return names
