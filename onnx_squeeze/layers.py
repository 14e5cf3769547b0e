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

- ``Conv`` with ``group == 1`` and ``ConvTranspose`` with ``group == 1`` and a constant
  weight (``[C_out, C_in, k...]`` and ``[C_in, C_out, k...]``): units are channels (axis 1).
  ``matrix`` sums the kernel taps, which is the effect of a spatially constant input channel
  on a conv without padding; ``reads`` marks the taps that are nonzero at all. A conv with
  padding sees zeros, not the constant, at the border, and a ConvTranspose adds overlapping
  taps unevenly, so both only absorb constants that are exactly zero
  (``absorbs_constants = False``).

- A grouped ``Conv`` (``1 < group``, not depthwise) is a weight op whose matrix is block
  diagonal; the analysis removes its channels only where every group keeps the same number of
  inputs and of outputs.

Refused (the node becomes a barrier, with the reason): a constant first operand of MatMul,
a weight of the wrong rank, non-float weights, a Gemm whose activation is ``B``, and a grouped
ConvTranspose. Depthwise convs are channel-wise ops, handled elsewhere.
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
    # False when a nonzero constant input cannot be folded into the bias exactly.
    absorbs_constants: bool = True
    reads: np.ndarray | None = None
    # Conv groups: the weight is [C_out, C_in / groups, k...] and ``matrix`` block-diagonal.
    groups: int = 1

    def __post_init__(self):
        if self.reads is None:
            self.reads = self.matrix != 0

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
    if node.op_type in ("Conv", "ConvTranspose"):
        return _match_conv(index, node_index, node)
    return None


def conv_has_padding(node: onnx.NodeProto) -> bool:
    """Return True if the conv or pool pads its input (explicitly or through auto_pad)."""
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return True
    return any(p != 0 for p in attribute(node, "pads", []) or [])


def is_depthwise(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Return True for a Conv with one input and one output channel per group (``[C, 1, k...]``)."""
    if node.op_type != "Conv" or len(node.input) < 2 or not index.is_constant(node.input[1]):
        return False
    group = attribute(node, "group", 1)
    dims = list(index.initializers[node.input[1]].dims)
    return group > 1 and len(dims) >= 3 and dims[0] == group and dims[1] == 1


def _match_conv(index: GraphIndex, node_index: int, node: onnx.NodeProto) -> Layer | str | None:
    x_name, w_name = node.input[0], node.input[1]
    if not index.is_constant(w_name):
        return f"{node.op_type} weight '{w_name}' is not a constant"
    if index.initializers[w_name].data_type not in FLOAT_TYPES:
        return f"weight '{w_name}' is not a floating-point tensor"
    groups = attribute(node, "group", 1)
    if groups != 1 and (node.op_type == "ConvTranspose"):
        return "grouped ConvTranspose is kept whole"
    if groups != 1 and is_depthwise(index, node):
        return None
    has_bias = len(node.input) > 2 and node.input[2] != ""
    if has_bias and not index.is_constant(node.input[2]):
        return f"{node.op_type} bias '{node.input[2]}' is not a constant"

    weight = index.array(w_name).astype(np.float64)
    spatial = tuple(range(2, weight.ndim))
    # Conv: [C_out, C_in, k...]; ConvTranspose: [C_in, C_out, k...].
    transpose = node.op_type == "ConvTranspose"
    summed = weight.sum(axis=spatial)
    reads = (weight != 0).any(axis=spatial)
    if groups > 1:
        # Output o of group G reads only the inputs of group G: spread into [C_out, C_in].
        summed, reads = _block_diagonal(summed, groups), _block_diagonal(reads, groups)
    matrix, reads = (summed.T, reads.T) if transpose else (summed, reads)
    absorbs = not transpose and not conv_has_padding(node)
    return Layer(
        node=node_index,
        name=index.node_name(node_index),
        op_type=node.op_type,
        input=x_name,
        output=node.output[0],
        input_axis=1,
        output_axis=1,
        weight=w_name,
        weight_slot=1,
        weight_out_axis=1 if transpose else 0,
        weight_in_axis=0 if transpose else 1,
        matrix=matrix,
        bias=BiasSlot(node_index, 2, 1.0),
        absorbs_constants=absorbs,
        reads=reads,
        groups=groups,
    )


def _block_diagonal(per_group: np.ndarray, groups: int) -> np.ndarray:
    """Turn a grouped conv's [C_out, C_in / groups] matrix into the full [C_out, C_in] one."""
    out_per_group, in_per_group = per_group.shape[0] // groups, per_group.shape[1]
    full = np.zeros((per_group.shape[0], in_per_group * groups), dtype=per_group.dtype)
    for group in range(groups):
        rows = slice(group * out_per_group, (group + 1) * out_per_group)
        full[rows, group * in_per_group:(group + 1) * in_per_group] = per_group[rows]
    return full


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
    if rank is None:
        return f"MatMul input '{x_name}' has unknown rank"
    # A 1-D input is one vector: its units are axis 0, and so are the output's.

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
