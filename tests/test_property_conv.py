"""Property test: random conv graphs with residual adds, concats, BatchNorm, depthwise and
grouped convs and pooling, with random dead filters, unused input channels and scattered zeros.

The minimizer must keep every output equal (zero padding included) and reach a fixed point:
a second run removes nothing.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnx_squeeze
from builders import GraphBuilder, assert_same_outputs

BLOCKS = ["conv", "residual", "concat", "batchnorm", "depthwise", "maxpool", "grouped"]


def _conv_weight(rng, c_out, c_in, k):
    w = rng.uniform(0.3, 1.0, (c_out, c_in, k, k)) * rng.choice([-1, 1], (c_out, c_in, k, k))
    w[rng.random(c_out) < 0.3] = 0.0  # dead filters
    w[:, rng.random(c_in) < 0.25] = 0.0  # input channels no filter reads
    w[rng.random(w.shape) < 0.2] = 0.0
    bias = np.where(rng.random(c_out) < 0.4, 0.0, rng.uniform(-1, 1, c_out))
    return w.astype(np.float32), bias.astype(np.float32)


class ConvNetBuilder:
    def __init__(self, rng, channels):
        self.rng = rng
        self.b = GraphBuilder(input_shape=("N", channels, 8, 8))
        self.x, self.c, self.size = "x", channels, 8

    def conv(self, x, c_in, c_out, k, act=True):
        w, bias = _conv_weight(self.rng, c_out, c_in, k)
        inputs = [x, self.b.const(w)] + ([self.b.const(bias)] if self.rng.random() < 0.8 else [])
        y = self.b.op("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4)
        return self.b.op(self.rng.choice(["Relu", "Sigmoid", "Tanh"]), [y]) if act else y

    def add_block(self, kind, width):
        b, rng = self.b, self.rng
        if kind == "conv":
            self.x, self.c = self.conv(self.x, self.c, width, int(rng.choice([1, 3]))), width
        elif kind == "residual":
            t = self.conv(self.x, self.c, width, 1)
            t = self.conv(t, width, self.c, int(rng.choice([1, 3])), act=False)
            self.x = b.op("Add", [self.x, t])
        elif kind == "concat":
            a = self.conv(self.x, self.c, width, 1)
            self.x, self.c = b.op("Concat", [a, self.conv(self.x, self.c, width, 3)], axis=1), 2 * width
        elif kind == "batchnorm":
            params = [rng.uniform(0.5, 1.5, self.c), rng.uniform(-1, 1, self.c),
                      rng.uniform(-1, 1, self.c), rng.uniform(0.2, 2.0, self.c)]
            self.x = b.op("BatchNormalization", [self.x, *[b.const(p.astype(np.float32)) for p in params]])
        elif kind == "depthwise":
            w = rng.uniform(-1, 1, (self.c, 1, 3, 3)).astype(np.float32)
            w[rng.random(self.c) < 0.3] = 0.0
            bias = rng.uniform(-1, 1, self.c).astype(np.float32)
            self.x = b.op("Conv", [self.x, b.const(w), b.const(bias)], group=self.c, kernel_shape=[3, 3], pads=[1] * 4)
        elif kind == "grouped" and self.c % 2 == 0:
            out = 2 * width
            w, bias = _conv_weight(rng, out, self.c // 2, 3)
            y = b.op("Conv", [self.x, b.const(w), b.const(bias)], group=2, kernel_shape=[3, 3], pads=[1] * 4)
            self.x, self.c = b.op("Relu", [y]), out
        elif kind == "maxpool" and self.size >= 4:
            self.x = b.op("MaxPool", [self.x], kernel_shape=[2, 2], strides=[2, 2])
            self.size //= 2

    def finish(self, head):
        b = self.b
        if head == "linear":
            pooled = b.op("Flatten", [b.op("GlobalAveragePool", [self.x])], axis=1)
            w = self.rng.uniform(-1, 1, (self.c, 3)).astype(np.float32)
            return b.model(b.gemm(pooled, w, self.rng.uniform(-1, 1, 3)))
        return b.model(self.conv(self.x, self.c, 3, 1, act=False))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    blocks=st.lists(st.tuples(st.sampled_from(BLOCKS), st.integers(1, 5)), min_size=1, max_size=5),
    channels=st.integers(1, 4),
    head=st.sampled_from(["linear", "conv"]),
)
def test_random_conv_graph_minimizes_exactly(seed, blocks, channels, head):
    net = ConvNetBuilder(np.random.default_rng(seed), channels)
    for kind, width in blocks:
        net.add_block(kind, width)
    model = net.finish(head)

    result = onnx_squeeze.minimize(model, batch_sizes=(1, 2))
    assert result.verification.passed, result.verification.message
    assert_same_outputs(model, result.model, atol=1e-4, rtol=1e-4)
    assert result.report["params_after"] <= result.report["params_before"]
    assert not onnx_squeeze.minimize(result.model, verify_outputs=False).changed
