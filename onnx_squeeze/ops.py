"""The table of element-wise ops: which ones the analysis understands and how each maps a
constant.

An element-wise op couples unit i of its (broadcast) inputs with unit i of its output, so a
dead unit stays dead through it and its constant value is the op applied to the input
constant (rule R1: ``a_i = act(b_i)``). Every op here is evaluated in float64 on the unit
constants; the result is rounded to the model's dtype only when it is written into a bias.
Ops not listed here, and not handled as weight or shape ops elsewhere, are barriers.

Adding an op means adding one entry to ``UNARY_OPS`` or ``BINARY_OPS`` and a test that
compares the folded constant with onnxruntime.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx

from .graph import GraphIndex, attribute

# Defaults of the ONNX operator spec.
SELU_ALPHA = 1.67326319217681884765625
SELU_GAMMA = 1.05070102214813232421875
LEAKY_RELU_ALPHA = 0.01
HARD_SIGMOID_ALPHA = 0.2
HARD_SIGMOID_BETA = 0.5

_erf = np.vectorize(math.erf, otypes=[np.float64])

UnaryFn = Callable[[np.ndarray, onnx.NodeProto, GraphIndex], np.ndarray]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _elu(x, node, _index):
    alpha = attribute(node, "alpha", 1.0)
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))


def _selu(x, node, _index):
    alpha = attribute(node, "alpha", SELU_ALPHA)
    gamma = attribute(node, "gamma", SELU_GAMMA)
    return gamma * np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))


def _celu(x, node, _index):
    alpha = attribute(node, "alpha", 1.0)
    return np.maximum(x, 0) + np.minimum(0, alpha * np.expm1(np.minimum(x, 0) / alpha))


def _hard_sigmoid(x, node, _index):
    alpha = attribute(node, "alpha", HARD_SIGMOID_ALPHA)
    beta = attribute(node, "beta", HARD_SIGMOID_BETA)
    return np.clip(alpha * x + beta, 0.0, 1.0)


def _gelu(x, node, _index):
    if attribute(node, "approximate", b"none") in (b"tanh", "tanh"):
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _clip(x, node, index):
    low, high = clip_bounds(node, index)
    return np.clip(x, low, high)


def clip_bounds(node: onnx.NodeProto, index: GraphIndex) -> tuple[float, float]:
    """Return Clip's (min, max); raises KeyError if a bound is not a constant."""
    if index.opset < 11:
        return attribute(node, "min", -np.inf), attribute(node, "max", np.inf)
    bounds = [-np.inf, np.inf]
    for slot in (1, 2):
        if len(node.input) > slot and node.input[slot]:
            bounds[slot - 1] = float(index.array(node.input[slot]))
    return bounds[0], bounds[1]


UNARY_OPS: dict[str, UnaryFn] = {
    "Identity": lambda x, node, index: x,
    "Dropout": lambda x, node, index: x,
    "Cast": lambda x, node, index: x,
    "Relu": lambda x, node, index: np.maximum(x, 0.0),
    "LeakyRelu": lambda x, node, index: np.where(x >= 0, x, attribute(node, "alpha", LEAKY_RELU_ALPHA) * x),
    "ThresholdedRelu": lambda x, node, index: np.where(x > attribute(node, "alpha", 1.0), x, 0.0),
    "Elu": _elu,
    "Selu": _selu,
    "Celu": _celu,
    "Sigmoid": lambda x, node, index: _sigmoid(x),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": lambda x, node, index: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Tanh": lambda x, node, index: np.tanh(x),
    "Softplus": lambda x, node, index: np.logaddexp(0.0, x),
    "Softsign": lambda x, node, index: x / (1.0 + np.abs(x)),
    "Mish": lambda x, node, index: x * np.tanh(np.logaddexp(0.0, x)),
    "Gelu": _gelu,
    "Erf": lambda x, node, index: _erf(x),
    "Clip": _clip,
    "Neg": lambda x, node, index: -x,
    "Abs": lambda x, node, index: np.abs(x),
    "Exp": lambda x, node, index: np.exp(x),
    "Sqrt": lambda x, node, index: np.sqrt(x),
    "Reciprocal": lambda x, node, index: 1.0 / x,
    "Not": lambda x, node, index: (x == 0).astype(np.float64),
}

# Extra inputs of unary ops that must be constants (Clip's bounds, Dropout's ratio and
# training flag); any other non-constant input makes the node a barrier.
UNARY_CONSTANT_SLOTS = {"Clip": (1, 2), "Dropout": (1, 2)}

BINARY_OPS: dict[str, Callable[..., np.ndarray]] = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": np.divide,
    "Pow": np.power,
    "Max": np.maximum,
    "Min": np.minimum,
    "PRelu": lambda x, slope: np.where(x >= 0, x, slope * x),
    # Comparisons and logic produce booleans, carried as 0.0 and 1.0.
    "Greater": lambda a, b: (a > b).astype(np.float64),
    "Less": lambda a, b: (a < b).astype(np.float64),
    "GreaterOrEqual": lambda a, b: (a >= b).astype(np.float64),
    "LessOrEqual": lambda a, b: (a <= b).astype(np.float64),
    "Equal": lambda a, b: (a == b).astype(np.float64),
    "And": lambda a, b: ((a != 0) & (b != 0)).astype(np.float64),
    "Or": lambda a, b: ((a != 0) | (b != 0)).astype(np.float64),
    # Where(condition, x, y) takes three operands; see the analysis for its known-ness rule.
    "Where": lambda condition, x, y: np.where(condition != 0, x, y),
}

# Cast is element-wise only between floating-point types. A cast to an integer type
# changes the values its consumers read, so it is a barrier.
FLOAT_CAST_TARGETS = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}


def unary_reason(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    """Return why a unary op cannot be treated as element-wise, or None when it can."""
    if node.op_type == "Cast" and attribute(node, "to") not in FLOAT_CAST_TARGETS:
        return "Cast to a non-float type"
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
        return "Dropout with a mask output"
    for slot in UNARY_CONSTANT_SLOTS.get(node.op_type, ()):
        if len(node.input) > slot and node.input[slot] and not index.is_constant(node.input[slot]):
            return f"input {slot} ('{node.input[slot]}') is not a constant"
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        if bool(index.array(node.input[2])):
            return "Dropout in training mode"
    return None
