"""R1 through every supported element-wise op: the folded constant must match onnxruntime.

Each model is Gemm(6 -> 8) -> op -> Gemm(8 -> 3) with hidden unit 2 dead (zero weight row,
bias set per case). The minimizer evaluates op(bias) itself and folds it into the second
Gemm's bias, so equal outputs at a tight tolerance show that its constant equals what
onnxruntime computes for the unit.
"""

from __future__ import annotations

import numpy as np
import pytest

import onnx_squeeze
from builders import GraphBuilder, assert_same_outputs, initializer_shapes, weights

DEAD = 2
BIASES = (-1.3, 0.0, 0.45, 2.5)
TIGHT = 2e-6


def _scalar(b: GraphBuilder, value: float) -> str:
    return b.const(np.array(value, np.float32))


def _per_unit(b: GraphBuilder, values) -> str:
    return b.const(np.asarray(values, np.float32))


# Each entry builds the op on hidden tensor h and returns its output.
CASES = {
    "Relu": lambda b, h: b.op("Relu", [h]),
    "LeakyRelu": lambda b, h: b.op("LeakyRelu", [h], alpha=0.2),
    "PRelu per unit": lambda b, h: b.op("PRelu", [h, _per_unit(b, np.linspace(0.05, 0.4, 8))]),
    "PRelu scalar": lambda b, h: b.op("PRelu", [h, b.const(np.array([0.25], np.float32))]),
    "Elu": lambda b, h: b.op("Elu", [h], alpha=0.7),
    "Selu": lambda b, h: b.op("Selu", [h]),
    "Celu": lambda b, h: b.op("Celu", [h], alpha=1.5),
    "Sigmoid": lambda b, h: b.op("Sigmoid", [h]),
    "HardSigmoid": lambda b, h: b.op("HardSigmoid", [h], alpha=0.3, beta=0.4),
    "Tanh": lambda b, h: b.op("Tanh", [h]),
    "Softplus": lambda b, h: b.op("Softplus", [h]),
    "Softsign": lambda b, h: b.op("Softsign", [h]),
    "ThresholdedRelu": lambda b, h: b.op("ThresholdedRelu", [h], alpha=0.5),
    "HardSwish": lambda b, h: b.op("HardSwish", [h]),
    "Clip": lambda b, h: b.op("Clip", [h, _scalar(b, 0.0), _scalar(b, 0.6)]),
    "Clip min only": lambda b, h: b.op("Clip", [h, _scalar(b, -0.2)]),
    "Identity": lambda b, h: b.op("Identity", [h]),
    "Dropout": lambda b, h: b.op("Dropout", [h]),
    "Cast float": lambda b, h: b.op("Cast", [h], to=1),
    "Neg": lambda b, h: b.op("Neg", [h]),
    "Abs": lambda b, h: b.op("Abs", [h]),
    "Exp": lambda b, h: b.op("Exp", [h]),
    "Erf": lambda b, h: b.op("Erf", [h]),
    "Gelu as Erf chain": lambda b, h: b.op(
        "Mul",
        [b.op("Mul", [h, b.op("Add", [b.op("Erf", [b.op("Div", [h, _scalar(b, 1.4142135)])]), _scalar(b, 1.0)])]),
         _scalar(b, 0.5)],
    ),
    "SiLU as x*sigmoid(x)": lambda b, h: b.op("Mul", [h, b.op("Sigmoid", [h])]),
    "Add per unit": lambda b, h: b.op("Add", [h, _per_unit(b, np.arange(8) * 0.1)]),
    "Sub scalar from left": lambda b, h: b.op("Sub", [_scalar(b, 0.3), h]),
    "Mul per unit [1, 8]": lambda b, h: b.op("Mul", [h, b.const(np.linspace(-1, 1, 8).reshape(1, 8).astype(np.float32))]),
    "Div scalar": lambda b, h: b.op("Div", [h, _scalar(b, 3.0)]),
    "Pow scalar": lambda b, h: b.op("Pow", [h, _scalar(b, 2.0)]),
    "Max constant": lambda b, h: b.op("Max", [h, _scalar(b, 0.1)]),
    "Min constant": lambda b, h: b.op("Min", [h, _scalar(b, 0.1)]),
}

OPSET_CASES = {
    "Gelu": (20, lambda b, h: b.op("Gelu", [h])),
    "Gelu tanh": (20, lambda b, h: b.op("Gelu", [h], approximate="tanh")),
    "Mish": (18, lambda b, h: b.op("Mish", [h])),
}


def _build(make_op, bias: float, opset: int = 17):
    rng = np.random.default_rng(7)
    w1, b1 = weights(rng, 6, 8)
    w2, b2 = weights(rng, 8, 3)
    w1[:, DEAD] = 0.0
    b1[DEAD] = bias
    b = GraphBuilder(opset=opset)
    h = b.gemm("x", w1, b1)
    a = make_op(b, h)
    return b.model(b.gemm(a, w2, b2))


def _check_folded(model):
    result = onnx_squeeze.minimize(model)
    assert result.verification.passed, result.verification.message
    shapes = sorted(s for s in initializer_shapes(result.model).values() if len(s) == 2 and s[0] > 1)
    assert shapes == [[3, 7], [7, 6]]
    assert result.report["params_after"] == result.report["params_before"] - 6 - 1 - 3 - _extra_params(model)
    assert_same_outputs(model, result.model, atol=TIGHT, rtol=TIGHT)
    assert not onnx_squeeze.minimize(result.model, verify_outputs=False).changed


def _extra_params(model) -> int:
    # Per-unit constants of element-wise ops (PRelu slope, Add/Mul vectors) lose one element.
    return sum(1 for t in model.graph.initializer if list(t.dims) in ([8], [1, 8])) - 1


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("op_name", sorted(CASES))
def test_dead_unit_constant_through_op(op_name, bias):
    _check_folded(_build(CASES[op_name], bias))


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("op_name", sorted(OPSET_CASES))
def test_dead_unit_constant_through_newer_op(op_name, bias):
    opset, make_op = OPSET_CASES[op_name]
    _check_folded(_build(make_op, bias, opset=opset))


def test_cast_to_float16_rounds_constant():
    # 1.0004 is 1.0 in float16: the folded constant must be the rounded one.
    def cast_round_trip(b, h):
        return b.op("Cast", [b.op("Cast", [h], to=10)], to=1)

    model = _build(cast_round_trip, 1.0004)
    result = onnx_squeeze.minimize(model, seed=1)
    assert result.changed
    assert_same_outputs(model, result.model, atol=TIGHT, rtol=TIGHT)


def test_sqrt_of_negative_constant_is_kept():
    # sqrt(-1.3) is NaN: the unit carries no finite constant, so it must stay.
    model = _build(lambda b, h: b.op("Sqrt", [b.op("Abs", [h])]), -1.3)
    assert onnx_squeeze.minimize(model).changed  # through Abs the constant is finite
    model = _build(lambda b, h: b.op("Sqrt", [h]), -1.3)
    result = onnx_squeeze.minimize(model, verify_outputs=False)
    shapes = sorted(s for s in initializer_shapes(result.model).values() if len(s) == 2 and s[0] > 1)
    assert shapes == [[3, 8], [8, 6]]
