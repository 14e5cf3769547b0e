"""Folding of Shape-based computations: exact results, valid models, no crashes."""

from __future__ import annotations

import numpy as np
import onnx

import onnx_squeeze
from builders import GraphBuilder, assert_same_outputs


def _conv_front(b: GraphBuilder, rng) -> str:
    """Conv(3 -> 8, 1x1) + Relu with three dead filters; input [N, 3, 6, 6]."""
    w = rng.uniform(-1, 1, (8, 3, 1, 1)).astype(np.float32)
    w[[1, 4, 6]] = 0.0
    bias = rng.uniform(-0.5, 0.5, 8).astype(np.float32)
    bias[[1, 4, 6]] = 0.0
    return b.op("Relu", [b.op("Conv", ["x", b.const(w), b.const(bias)], kernel_shape=[1, 1])])


def _head(b: GraphBuilder, rng, x: str, features: int) -> str:
    return b.gemm(x, rng.uniform(-1, 1, (features, 5)).astype(np.float32), np.zeros(5, np.float32))


def _check(model):
    result = onnx_squeeze.minimize(model)
    assert result.verification.passed, result.verification.message
    onnx.checker.check_model(result.model, full_check=True)
    names = [t.name for t in result.model.graph.initializer]
    assert len(names) == len(set(names))
    assert_same_outputs(model, result.model)
    assert not onnx_squeeze.minimize(result.model, verify_outputs=False).changed
    return result


def test_two_reshapes_share_computed_target():
    rng = np.random.default_rng(0)
    b = GraphBuilder(input_shape=("N", 3, 6, 6), opset=14)
    h = _conv_front(b, rng)
    batch = b.op("Gather", [b.op("Shape", [h]), b.const(np.array([0]))], axis=0)
    target = b.op("Concat", [batch, b.const(np.array([288]))], axis=0)
    first = b.op("Reshape", [h, target])
    second = b.op("Reshape", [b.op("Relu", [h]), target])
    result = _check(b.model([_head(b, rng, first, 288), _head(b, rng, second, 288)]))
    assert result.changed


def test_shape_value_cast_to_float_is_not_folded():
    rng = np.random.default_rng(1)
    b = GraphBuilder(input_shape=("N", 3, 6, 6), opset=14)
    h = _conv_front(b, rng)
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1)
    channels = b.op("Cast", [b.op("Gather", [b.op("Shape", [h]), b.const(np.array(1))], axis=0)], to=1)
    _check(b.model(b.op("Div", [_head(b, rng, pooled, 8), channels])))


def test_unsqueeze_axes_respected():
    rng = np.random.default_rng(2)
    b = GraphBuilder(input_shape=(2, 3, 6, 6), opset=13)
    h = _conv_front(b, rng)
    sizes = b.op("Slice", [b.op("Shape", [h]), b.const(np.array([2])), b.const(np.array([4]))])
    column = b.op("Cast", [b.op("Unsqueeze", [sizes, b.const(np.array([1]))])], to=1)  # [2, 1]
    y = _head(b, rng, b.op("Flatten", [h], axis=1), 288)
    _check(b.model(b.op("Mul", [y, column])))


def test_shape_arithmetic_overflow_left_alone():
    rng = np.random.default_rng(3)
    b = GraphBuilder(input_shape=("N", 3, 6, 6), opset=13)
    h = _conv_front(b, rng)
    channels = b.op("Gather", [b.op("Shape", [h]), b.const(np.array([1]))], axis=0)
    end = b.op("Add", [channels, b.const(np.array([2**63 - 1]))])  # wraps around in the runtime
    reversed_h = b.op("Slice", [h, b.const(np.array([-1])), end, b.const(np.array([1])), b.const(np.array([-1]))])
    _check(b.model(_head(b, rng, b.op("Flatten", [reversed_h], axis=1), 288)))
