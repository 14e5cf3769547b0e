"""Matching of weight ops: the nodes that read units through a constant weight matrix.

A weight op computes ``z = W x (+ b)``. Row o of the weight (``W[o, :]``) writes output unit
o, column j (``W[:, j]``) reads input unit j. The analysis needs, for every weight op, the
matrix in ``[out, in]`` orientation with any scale applied, the axis of the stored weight
that indexes output and input units, and the place where a folded constant can be added to
the bias.

Recognized here:

- ``Gemm(A, B, C)`` with a constant ``B`` and a 2-D activation ``A``: ``transB`` selects the
  layout (``[out, in]`` when 1, as the TorchScript and dynamo exporters write a Linear on 2-D
  input, ``[in, out]`` when 0); ``alpha`` scales the matrix; a fold is added to ``C`` divided
  by ``beta``. ``transA = 1`` puts the units of ``A`` on axis 0.
- ``MatMul(x, W)`` with a constant 2-D ``W`` of layout ``[in, out]``: units are on the last
  axis of ``x`` and of the output. When the output's only consumer is an ``Add`` of a
  per-unit constant (the exporter's bias), a fold goes into that constant, otherwise an
  ``Add`` is inserted.

Refused (the node becomes a barrier, with the reason): a constant first operand of MatMul,
a weight of rank other than 2, non-float weights, and a Gemm whose activation is ``B``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .graph import FLOAT_TYPES, GraphIndex, attribute


@dataclass(frozen=True)
class BiasSlot:
    """An initializer input that receives folded constants: ``value += delta / divisor``."""

    node: int
    slot: int
    divisor: float


@dataclass
class Layer:
    """A matched weight op; see the module docstring for the conventions."""

    node: int
    name: str
    op_type: str
    input: str
    output: str
    input_axis: int
    output_axis: int
    weight: str
    weight_slot: int
    weight_out_axis: int
    weight_in_axis: int
    matrix: np.ndarray
    bias: BiasSlot | None
    # Gemm whose C is ignored (beta == 0): a fold must set beta to 1 and replace C.
    replace_bias: bool = False

    @property
    def out_units(self) -> int:
        return self.matrix.shape[0]

    @property
    def in_units(self) -> int:
        return self.matrix.shape[1]


def match_layer(index: GraphIndex, node_index: int) -> Layer | str | None:
    """Return a ``Layer``, a reason why this weight op is refused, or None if it is no weight op."""
    node = index.nodes[node_index]
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Gemm":
        return _match_gemm(index, node_index, node)
    if node.op_type == "MatMul":
        return _match_matmul(index, node_index, node)
    return None


def _weight_reason(index: GraphIndex, name: str) -> str | None:
    if index.initializers[name].data_type not in FLOAT_TYPES:
        return f"weight '{name}' is not a floating-point tensor"
    if len(index.initializers[name].dims) != 2:
        return f"weight '{name}' has rank {len(index.initializers[name].dims)}, expected 2"
    return None


def _match_gemm(index: GraphIndex, node_index: int, node: onnx.NodeProto) -> Layer | str:
    a_name, b_name = node.input[0], node.input[1]
    if index.is_constant(a_name) or not index.is_constant(b_name):
        return "Gemm without a constant weight in input B and an activation in input A"
    reason = _weight_reason(index, b_name)
    if reason:
        return reason

    trans_a = attribute(node, "transA", 0)
    trans_b = attribute(node, "transB", 0)
    alpha = float(attribute(node, "alpha", 1.0))
    beta = float(attribute(node, "beta", 1.0))

    weight = index.array(b_name).astype(np.float64)
    # B is [in, out] when transB == 0 and [out, in] when transB == 1.
    matrix = alpha * (weight if trans_b else weight.T)
    weight_out_axis, weight_in_axis = (0, 1) if trans_b else (1, 0)

    has_c = len(node.input) > 2 and node.input[2] != ""
    if has_c and not index.is_constant(node.input[2]):
        return f"Gemm bias C ('{node.input[2]}') is not a constant"
    if has_c and beta != 0.0:
        c_shape = index.shapes[node.input[2]]
        if int(np.prod(c_shape)) not in (1, matrix.shape[0]) or (len(c_shape) == 2 and c_shape[0] != 1):
            return f"Gemm bias C ('{node.input[2]}') of shape {list(c_shape)} is not per output unit"

    bias = BiasSlot(node_index, 2, beta if beta != 0.0 else 1.0)
    return Layer(
        node=node_index,
        name=index.node_name(node_index),
        op_type="Gemm",
        input=a_name,
        output=node.output[0],
        input_axis=0 if trans_a else 1,
        output_axis=1,
        weight=b_name,
        weight_slot=1,
        weight_out_axis=weight_out_axis,
        weight_in_axis=weight_in_axis,
        matrix=matrix,
        bias=bias,
        replace_bias=has_c and beta == 0.0,
    )


def _match_matmul(index: GraphIndex, node_index: int, node: onnx.NodeProto) -> Layer | str | None:
    x_name, w_name = node.input[0], node.input[1]
    if index.is_constant(x_name) and index.is_constant(w_name):
        return None
    if index.is_constant(x_name):
        return "MatMul with a constant first operand (W @ x) is not supported"
    if not index.is_constant(w_name):
        return None  # activation @ activation, as in attention: not a weight op
    reason = _weight_reason(index, w_name)
    if reason:
        return reason
    rank = index.rank(x_name)
    if rank is None or rank < 2:
        return f"MatMul input '{x_name}' has unknown rank or rank below 2"

    weight = index.array(w_name).astype(np.float64)  # [in, out]
    return Layer(
        node=node_index,
        name=index.node_name(node_index),
        op_type="MatMul",
        input=x_name,
        output=node.output[0],
        input_axis=rank - 1,
        output_axis=rank - 1,
        weight=w_name,
        weight_slot=1,
        weight_out_axis=1,
        weight_in_axis=0,
        matrix=weight.T,
        bias=_matmul_bias(index, node, weight.shape[1]),
    )


def _matmul_bias(index: GraphIndex, node: onnx.NodeProto, out_units: int) -> BiasSlot | None:
    uses = index.uses(node.output[0])
    if len(uses) != 1 or node.output[0] in index.graph_outputs:
        return None
    add = index.nodes[uses[0].node]
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    other_slot = 1 - uses[0].slot
    other = add.input[other_slot]
    if not index.is_constant(other):
        return None
    shape = index.shapes[other]
    # The constant must be [out] or [1, ..., 1, out] so that it lines up with the last axis.
    if not shape or shape[-1] != out_units or any(d != 1 for d in shape[:-1]):
        return None
    if len(shape) > (index.rank(node.output[0]) or 0):
        return None
    return BiasSlot(uses[0].node, other_slot, 1.0)
