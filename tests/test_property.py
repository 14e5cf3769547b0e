"""Property test: random MLPs with random dead rows, columns and biases.

For each generated chain the minimizer must keep the outputs, leave nothing removable (a
second run changes nothing), and end at the widths that an independent reference
computation of rules R1 and R2 predicts.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnx_squeeze
from builders import GraphBuilder, assert_same_outputs

ACTIVATIONS = ["Relu", "Tanh", "Sigmoid", "LeakyRelu", "Elu", None]
LAYOUTS = ["gemm-out-in", "gemm-in-out", "matmul"]


@st.composite
def mlps(draw):
    n_layers = draw(st.integers(1, 4))
    dims = [draw(st.integers(1, 7)) for _ in range(n_layers + 1)]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    layers = []
    for n_in, n_out in zip(dims[:-1], dims[1:]):
        w = (rng.uniform(0.3, 1.0, (n_in, n_out)) * rng.choice([-1, 1], (n_in, n_out))).astype(np.float32)
        w[:, rng.random(n_out) < 0.3] = 0.0  # dead output units
        w[rng.random(n_in) < 0.3, :] = 0.0  # unused input units
        w[rng.random((n_in, n_out)) < 0.2] = 0.0  # scattered zeros
        bias = np.where(rng.random(n_out) < 0.3, 0.0, rng.uniform(-1, 1, n_out)).astype(np.float32)
        layers.append((w, bias if draw(st.booleans()) else None))
    activations = [draw(st.sampled_from(ACTIVATIONS)) for _ in range(n_layers - 1)]
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(n_layers)]
    return layers, activations, layouts


def build(layers, activations, layouts):
    b = GraphBuilder(input_shape=("N", layers[0][0].shape[0]))
    h = "x"
    for i, ((w, bias), layout) in enumerate(zip(layers, layouts)):
        if layout == "matmul":
            h = b.linear_matmul(h, w, bias)
        else:
            h = b.gemm(h, w, bias, trans_b=1 if layout == "gemm-out-in" else 0)
        if i < len(activations) and activations[i]:
            h = b.op(activations[i], [h])
    return b.model(h)


def reference_widths(layers) -> list[int]:
    """Hidden widths after R1/R2 to the fixed point, computed directly on the chain."""
    # Forward: which output units of each layer hold a constant for every input.
    known = []
    previous = np.zeros(layers[0][0].shape[0], dtype=bool)  # graph input: never constant
    for w, _ in layers:
        unknown_read = (w != 0) & ~previous[:, None]
        previous = ~unknown_read.any(axis=0)
        known.append(previous)

    # Backward to a fixed point: a hidden unit goes if it is constant or no kept row reads it.
    n_hidden = len(layers) - 1
    removed = [np.zeros(layers[i][0].shape[1], dtype=bool) for i in range(n_hidden)]
    changed = True
    while changed:
        changed = False
        for i in range(n_hidden):
            next_w = layers[i + 1][0]
            kept_rows = ~removed[i + 1] if i + 1 < n_hidden else np.ones(next_w.shape[1], dtype=bool)
            read = (next_w[:, kept_rows] != 0).any(axis=1)
            new = known[i] | ~read
            if not np.array_equal(new, removed[i]):
                removed[i], changed = new, True

    widths = []
    for mask in removed:
        widths.append(max(int((~mask).sum()), 1))  # a layer never becomes empty
    return widths


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mlps())
def test_random_mlp_minimizes_exactly(case):
    layers, activations, layouts = case
    model = build(layers, activations, layouts)
    result = onnx_squeeze.minimize(model, batch_sizes=(1, 4))
    assert result.verification.passed, result.verification.message
    assert_same_outputs(model, result.model)

    again = onnx_squeeze.minimize(result.model, verify_outputs=False)
    assert not again.changed

    widths = [w[1] for w in result.report["widths_after"].values()][:-1]
    assert widths == reference_widths(layers)
    assert result.report["params_after"] <= result.report["params_before"]
