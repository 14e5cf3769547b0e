"""Size and cost figures of a model: dense parameters, non-zeros, multiply-adds, bytes.

Conventions:

- parameters: every element of every floating-point initializer or Constant node, zeros
  included; integer constants (shapes, Gather indices) do not count;
- non-zeros: the floating-point initializer elements that are not exactly zero;
- multiply-adds: per sample, for Gemm, MatMul and Conv nodes with a constant weight; a
  symbolic dim other than the batch dim counts as 1, so a sequence model is counted per token;
- bytes: the serialized size of the model including its tensor data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import FLOAT_TYPES, GraphIndex, attribute


@dataclass(frozen=True)
class ModelStats:
    params: int
    nonzero: int
    macs: int
    bytes: int

    def as_dict(self, suffix: str) -> dict[str, int]:
        return {
            f"params_{suffix}": self.params,
            f"nonzero_{suffix}": self.nonzero,
            f"macs_{suffix}": self.macs,
            f"bytes_{suffix}": self.bytes,
        }


def model_stats(model: onnx.ModelProto, *, size_bytes: int | None = None) -> ModelStats:
    """Count the figures above; ``size_bytes`` overrides the serialized size (a file's size)."""
    params = nonzero = 0
    for tensor in _constant_tensors(model):
        if tensor.data_type not in FLOAT_TYPES:
            continue
        array = numpy_helper.to_array(tensor)
        params += array.size
        nonzero += int(np.count_nonzero(array))
    if size_bytes is None:
        size_bytes = model.ByteSize()
    return ModelStats(params=params, nonzero=nonzero, macs=count_macs(model), bytes=size_bytes)


def _constant_tensors(model: onnx.ModelProto):
    """Initializers and the tensors of Constant nodes, which normalization makes initializers."""
    yield from model.graph.initializer
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name == "value":
                yield attr.t
            elif attr.name in ("value_float", "value_floats"):
                values = [attr.f] if attr.name == "value_float" else list(attr.floats)
                yield numpy_helper.from_array(np.array(values, dtype=np.float32))


def _per_sample(shape) -> int:
    """Product of the dims after the batch dim, with symbolic dims counted as 1."""
    if shape is None:
        return 1
    return int(np.prod([d if isinstance(d, int) else 1 for d in shape[1:]]))


def count_macs(model: onnx.ModelProto) -> int:
    if not model.graph.value_info:
        # Conv and MatMul costs depend on activation shapes, so infer them on a copy.
        from .normalize import infer_shapes

        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = infer_shapes(copy)
    index = GraphIndex(model)
    total = 0
    for node in index.nodes:
        weight_name = node.input[1] if len(node.input) > 1 else ""
        if node.op_type not in ("Gemm", "MatMul", "Conv") or not index.is_constant(weight_name):
            continue
        weight = index.initializers[weight_name].dims
        if node.op_type == "Gemm":
            total += int(np.prod(weight))
        elif node.op_type == "MatMul":
            shape = index.shapes.get(node.input[0])
            rows = _per_sample(shape[:-1]) if shape is not None else 1
            total += rows * int(np.prod(weight))
        else:
            out_shape = index.shapes.get(node.output[0])
            positions = _per_sample(out_shape[:1] + out_shape[2:]) if out_shape is not None else 1
            total += positions * int(np.prod(weight))
    return total


def layer_widths(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Return (input units, output units) per weight op, keyed by node name."""
    index = GraphIndex(model)
    widths = {}
    for position, node in enumerate(index.nodes):
        weight_name = node.input[1] if len(node.input) > 1 else ""
        if node.op_type not in ("Gemm", "MatMul", "Conv") or not index.is_constant(weight_name):
            continue
        dims = list(index.initializers[weight_name].dims)
        if node.op_type == "Gemm" and attribute(node, "transB", 0):
            widths[index.node_name(position)] = (dims[1], dims[0])
        elif node.op_type in ("Gemm", "MatMul") and len(dims) == 2:
            widths[index.node_name(position)] = (dims[0], dims[1])
        elif node.op_type == "Conv":
            widths[index.node_name(position)] = (dims[1] * attribute(node, "group", 1), dims[0])
    return widths
