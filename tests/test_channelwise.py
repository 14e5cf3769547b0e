"""Channel-wise ops and conv variants on hand-built graphs: the constant of a dead channel
through each op, and the ops that must keep channels."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_squeeze
from builders import GraphBuilder, assert_same_outputs, initializer_shapes

DEAD = 2


def _conv(b: GraphBuilder, x: str, rng, c_in: int, c_out: int, k: int = 1, *, pads=0, dead=(), bias=0.4, dims=2):
    w = rng.uniform(0.3, 1.0, (c_out, c_in) + (k,) * dims).astype(np.float32)
    bias_values = rng.uniform(-0.5, 0.5, c_out).astype(np.float32)
    for unit in dead:
        w[unit] = 0.0
        bias_values[unit] = bias
    return b.op("Conv", [x, b.const(w, "W"), b.const(bias_values, "B")], kernel_shape=[k] * dims, pads=[pads] * 2 * dims)


def _two_convs(between, *, input_shape=("N", 3, 8, 8), bias=0.4, opset=17):
    """Conv(3 -> 6) -> Relu -> between(h) -> Conv(6 -> 4, 1x1) with channel 2 dead."""
    rng = np.random.default_rng(3)
    b = GraphBuilder(input_shape=input_shape, opset=opset)
    dims = len(input_shape) - 2
    h = b.op("Relu", [_conv(b, "x", rng, 3, 6, 1, dead=(DEAD,), bias=bias, dims=dims)])
    h = between(b, h)
    return b.model(_conv(b, h, rng, 6, 4, 1, dims=dims))


def _minimize(model):
    result = onnx_squeeze.minimize(model)
    assert result.verification.passed, result.verification.message
    assert_same_outputs(model, result.model, atol=1e-5, rtol=1e-5)
    onnx.checker.check_model(result.model, full_check=True)
    assert not onnx_squeeze.minimize(result.model, verify_outputs=False).changed
    return result


def _conv_shapes(result):
    return sorted(tuple(s) for s in initializer_shapes(result.model).values() if len(s) >= 3)


CHANNEL_OPS = {
    "MaxPool": lambda b, h: b.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2]),
    "MaxPool padded": lambda b, h: b.op("MaxPool", [h], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "AveragePool": lambda b, h: b.op("AveragePool", [h], kernel_shape=[2, 2], strides=[2, 2]),
    "AveragePool padded, pads not counted": lambda b, h: b.op("AveragePool", [h], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "GlobalAveragePool": lambda b, h: b.op("GlobalAveragePool", [h]),
    "GlobalMaxPool": lambda b, h: b.op("GlobalMaxPool", [h]),
    "Resize nearest": lambda b, h: b.op("Resize", [h, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest"),
    "Resize linear": lambda b, h: b.op("Resize", [h, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="linear"),
    "Pad edge": lambda b, h: b.op("Pad", [h, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))], mode="edge"),
    "Pad reflect": lambda b, h: b.op("Pad", [h, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))], mode="reflect"),
    "InstanceNormalization": lambda b, h: b.op(
        "InstanceNormalization", [h, b.const(np.linspace(0.5, 1.5, 6).astype(np.float32)),
                                  b.const(np.linspace(-1, 1, 6).astype(np.float32))]),
    "BatchNormalization": lambda b, h: b.op(
        "BatchNormalization", [h, *[b.const(v.astype(np.float32)) for v in
                                    (np.linspace(0.5, 1.5, 6), np.linspace(-1, 1, 6), np.linspace(-0.2, 0.2, 6), np.linspace(0.5, 2, 6))]]),
    "Transpose there and back": lambda b, h: b.op("Transpose", [b.op("Relu", [b.op("Transpose", [h], perm=[0, 2, 3, 1])])], perm=[0, 3, 1, 2]),
    "ReduceMean over space": lambda b, h: b.op("ReduceMean", [h], axes=[2, 3], keepdims=1),
    "Expand over space": lambda b, h: b.op(
        "Add", [h, b.op("Expand", [b.op("ReduceMean", [h], axes=[2, 3], keepdims=1), b.const(np.array([1, 6, 8, 8]))])]),
    "spatial mask": lambda b, h: b.op("Mul", [h, b.op("Sigmoid", [b.op("ReduceMean", [h], axes=[1], keepdims=1)])]),
}


@pytest.mark.parametrize("bias", [0.0, 0.4])
@pytest.mark.parametrize("name", sorted(CHANNEL_OPS))
def test_dead_channel_through_op(name, bias):
    result = _minimize(_two_convs(CHANNEL_OPS[name], bias=bias))
    if name == "InstanceNormalization" and bias != 0:
        # onnxruntime's float32 mean of a nonzero constant channel is not exact, and the
        # division by sqrt(eps) magnifies the difference, so the channel is kept.
        assert _conv_shapes(result) == [(4, 6, 1, 1), (6, 3, 1, 1)]
        return
    if name == "spatial mask":
        # The mask averages over all channels, so the dead one is read there and stays.
        assert _conv_shapes(result) == [(4, 6, 1, 1), (6, 3, 1, 1)]
        return
    assert _conv_shapes(result) == [(4, 5, 1, 1), (5, 3, 1, 1)]


def test_average_pool_counting_padding_keeps_nonzero_constant():
    def between(b, h):
        return b.op("AveragePool", [h], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)

    kept = _minimize(_two_convs(between, bias=0.4))
    assert _conv_shapes(kept) == [(4, 6, 1, 1), (6, 3, 1, 1)]
    removed = _minimize(_two_convs(between, bias=0.0))
    assert _conv_shapes(removed) == [(4, 5, 1, 1), (5, 3, 1, 1)]


def test_pad_with_other_constant_keeps_channel():
    def between(b, h):
        return b.op("Pad", [h, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1])), b.const(np.float32(0.1))], mode="constant")

    assert _conv_shapes(_minimize(_two_convs(between, bias=0.4))) == [(4, 6, 1, 1), (6, 3, 1, 1)]
    assert _conv_shapes(_minimize(_two_convs(between, bias=0.0))) == [(4, 6, 1, 1), (6, 3, 1, 1)]


def test_conv1d_dead_channel():
    result = _minimize(_two_convs(lambda b, h: h, input_shape=("N", 3, 16)))
    assert _conv_shapes(result) == [(4, 5, 1), (5, 3, 1)]


def test_padded_3x3_consumer_keeps_constant_channel():
    rng = np.random.default_rng(5)
    b = GraphBuilder(input_shape=("N", 3, 8, 8))
    h = b.op("Relu", [_conv(b, "x", rng, 3, 6, 1, dead=(DEAD,), bias=0.4)])
    model = b.model(_conv(b, h, rng, 6, 4, 3, pads=1))
    result = _minimize(model)
    assert _conv_shapes(result) == [(4, 6, 3, 3), (6, 3, 1, 1)]
    assert any("pads its input" in r.reason for r in result.refusals)


def test_conv_transpose_reads_and_writes_channels():
    rng = np.random.default_rng(6)
    b = GraphBuilder(input_shape=("N", 3, 6, 6))
    h = b.op("Relu", [_conv(b, "x", rng, 3, 6, 1, dead=(DEAD,), bias=0.0)])
    w = rng.uniform(0.3, 1.0, (6, 5, 2, 2)).astype(np.float32)  # [C_in, C_out, k, k]
    w[:, 1] = 0.0  # output channel 1 of the ConvTranspose is its bias alone
    bias = np.linspace(-0.5, 0.5, 5).astype(np.float32)
    up = b.op("Relu", [b.op("ConvTranspose", [h, b.const(w), b.const(bias)], kernel_shape=[2, 2], strides=[2, 2])])
    result = _minimize(b.model(_conv(b, up, rng, 5, 4, 1)))
    assert _conv_shapes(result) == [(4, 4, 1, 1), (5, 3, 1, 1), (5, 4, 2, 2)]


def _grouped_model(dead):
    rng = np.random.default_rng(9)
    b = GraphBuilder(input_shape=("N", 3, 8, 8))
    h = b.op("Relu", [_conv(b, "x", rng, 3, 6, 1, dead=dead, bias=0.0)])
    w = rng.uniform(-1, 1, (6, 3, 3, 3)).astype(np.float32)  # 2 groups of 3 channels
    g = b.op("Relu", [b.op("Conv", [h, b.const(w)], group=2, kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    return b.model(_conv(b, g, rng, 6, 4, 1))


def test_grouped_conv_unequal_removal_is_kept():
    result = _minimize(_grouped_model(dead=(2,)))  # only group 0 would lose a channel
    assert not result.changed


def test_grouped_conv_equal_removal_per_group():
    result = _minimize(_grouped_model(dead=(2, 4)))  # one channel from each group
    grouped = next(n for n in result.model.graph.node if n.op_type == "Conv" and any(a.name == "group" for a in n.attribute))
    assert initializer_shapes(result.model)[grouped.input[1]] == [6, 2, 3, 3]
    assert [a.i for a in grouped.attribute if a.name == "group"] == [2]


def test_grouped_conv_dead_outputs_per_group():
    rng = np.random.default_rng(10)
    b = GraphBuilder(input_shape=("N", 4, 8, 8))
    w = rng.uniform(-1, 1, (6, 2, 1, 1)).astype(np.float32)  # 2 groups: 2 inputs, 3 outputs each
    w[[1, 4]] = 0.0  # output 1 of group 0 and output 1 of group 1 are their biases
    bias = np.linspace(-0.5, 0.5, 6).astype(np.float32)
    g = b.op("Relu", [b.op("Conv", ["x", b.const(w), b.const(bias)], group=2, kernel_shape=[1, 1])])
    result = _minimize(b.model(_conv(b, g, rng, 6, 3, 1)))
    assert _conv_shapes(result) == [(3, 4, 1, 1), (4, 2, 1, 1)]


def test_depthwise_zero_kernel_folds_bias():
    def between(b, h):
        w = np.random.default_rng(4).uniform(-1, 1, (6, 1, 3, 3)).astype(np.float32)
        w[4] = 0.0  # channel 4 leaves the depthwise conv as its bias, 0.25
        bias = np.full(6, 0.25, np.float32)
        return b.op("Conv", [h, b.const(w), b.const(bias)], group=6, kernel_shape=[3, 3], pads=[1, 1, 1, 1])

    result = _minimize(_two_convs(between, bias=0.0))
    assert _conv_shapes(result) == [(4, 1, 3, 3), (4, 3, 1, 1), (4, 4, 1, 1)]
    depthwise = [n for n in result.model.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert [a.i for a in depthwise[0].attribute if a.name == "group"] == [4]


@pytest.mark.parametrize("op_type", ["BatchNormalization", "InstanceNormalization"])
def test_zero_scale_channel_is_constant(op_type):
    def between(b, h):
        scale = np.linspace(0.5, 1.5, 6).astype(np.float32)
        scale[4] = 0.0  # channel 4 is B[4] = -2 for every input; relu makes it 0
        bias = np.linspace(-1, 1, 6).astype(np.float32)
        bias[4] = -2.0
        params = [scale, bias]
        if op_type == "BatchNormalization":
            params += [np.zeros(6, np.float32), np.ones(6, np.float32)]
        return b.op("Relu", [b.op(op_type, [h, *[b.const(p) for p in params]])])

    result = _minimize(_two_convs(between, bias=0.4))
    # BatchNorm also passes dead channel 2's constant on exactly; InstanceNorm keeps it.
    expected = (4, 4, 1, 1) if op_type == "BatchNormalization" else (4, 5, 1, 1)
    assert expected in _conv_shapes(result)


def test_zero_channel_times_unbounded_value_is_kept():
    # 0 * exp(z) is NaN where exp overflows, so the zero channel is not a constant there.
    def between(b, h):
        rng = np.random.default_rng(12)
        return b.op("Mul", [h, b.op("Exp", [_conv(b, "x", rng, 3, 6, 1)])])

    assert _conv_shapes(_minimize(_two_convs(between, bias=0.0)))[0] == (4, 6, 1, 1)


def test_zero_channel_times_sigmoid_gate_is_removed():
    def between(b, h):
        rng = np.random.default_rng(12)
        return b.op("Mul", [h, b.op("Sigmoid", [_conv(b, "x", rng, 3, 6, 1)])])

    assert (4, 5, 1, 1) in _conv_shapes(_minimize(_two_convs(between, bias=0.0)))
