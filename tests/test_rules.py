"""The removal rules on hand-built fully-connected graphs: R1, R2, cascades, layouts,
coupling, whole dead layers, shared initializers and input pruning."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_squeeze
from builders import GraphBuilder, assert_same_outputs, float_params, initializer_shapes, run, seeded_feeds, weights


def _minimize(model, **options):
    result = onnx_squeeze.minimize(model, **options)
    assert result.verification.passed, result.verification.message
    assert_same_outputs(model, result.model)
    onnx.checker.check_model(result.model, full_check=True)
    again = onnx_squeeze.minimize(result.model, verify_outputs=False, prune_inputs=options.get("prune_inputs", False))
    assert not again.changed, "a second run removed more"
    return result


def _layer(result, index):
    return result.report["layers"][index]


def _widths(result):
    return {node: tuple(w) for node, w in result.report["widths_after"].items()}


def _mlp(dims, seed=0):
    rng = np.random.default_rng(seed)
    return [weights(rng, a, b) for a, b in zip(dims[:-1], dims[1:])]


def _chain(params, *, act="Relu", layout="gemm", input_shape=("N", 6)):
    b = GraphBuilder(input_shape=input_shape)
    h = "x"
    for i, (w, bias) in enumerate(params):
        h = b.gemm(h, w, bias) if layout == "gemm" else b.linear_matmul(h, w, bias)
        if i < len(params) - 1:
            h = b.op(act, [h])
    return b.model(h)


def test_unused_unit_removed_without_fold():
    params = _mlp([6, 8, 3])
    params[1][0][4, :] = 0.0  # column 4 of the second layer reads nothing
    result = _minimize(_chain(params))
    assert _layer(result, 0)["removed_output_units"] == [4]
    assert _layer(result, 1)["removed_input_units"] == [4]
    assert not _layer(result, 1)["folded_constants"]


def test_dead_unit_folded_into_consumer_bias():
    params = _mlp([6, 8, 3])
    params[0][0][:, 5] = 0.0
    params[0][1][5] = 0.8  # relu(0.8) = 0.8 reaches the next layer as a constant
    result = _minimize(_chain(params))
    assert _layer(result, 1)["folded_constants"]
    folded_bias = [t for t in result.model.graph.initializer if list(t.dims) == [3]][0]
    expected = params[1][1] + 0.8 * params[1][0][5]
    np.testing.assert_allclose(onnx.numpy_helper.to_array(folded_bias), expected, rtol=1e-6)


def test_forward_cascade_in_one_run():
    params = _mlp([6, 8, 5, 3])
    params[0][0][:, 1] = 0.0
    params[1][0][:, 3] = 0.0
    params[1][0][1, 3] = 0.7  # unit 3 of layer 2 reads only the dead unit 1 of layer 1
    result = _minimize(_chain(params))
    assert _layer(result, 0)["removed_output_units"] == [1]
    assert _layer(result, 1)["removed_output_units"] == [3]
    assert result.report["rounds"] >= 1


def test_backward_cascade():
    params = _mlp([6, 8, 5, 3])
    params[2][0][2, :] = 0.0  # no layer reads unit 2 of layer 2
    params[1][0][:, :] = np.where(np.arange(8)[:, None] == 6, 0.0, params[1][0])
    params[1][0][6, 2] = 0.9  # unit 6 of layer 1 is read only by unit 2 of layer 2
    result = _minimize(_chain(params))
    assert _layer(result, 1)["removed_output_units"] == [2]
    assert _layer(result, 0)["removed_output_units"] == [6]


@pytest.mark.parametrize("layout", ["gemm", "matmul"])
def test_both_weight_layouts(layout):
    params = _mlp([6, 8, 4, 3], seed=3)
    params[0][0][:, [0, 7]] = 0.0
    params[1][0][:, 2] = 0.0
    params[2][0][1, :] = 0.0
    result = _minimize(_chain(params, layout=layout, act="Tanh"))
    assert sorted(_widths(result).values()) == sorted([(6, 6), (6, 2), (2, 3)])


@pytest.mark.parametrize(
    "trans_b, attrs, bias_shape",
    [
        (0, {}, (3,)),
        (1, {"alpha": 0.5, "beta": 2.0}, (3,)),
        (1, {}, (1, 3)),
        (1, {"beta": 0.0}, (3,)),
        (1, {}, None),
        (1, {}, ()),
    ],
    ids=["transB0", "alpha-beta", "C-1xN", "beta0", "no-C", "scalar-C"],
)
def test_gemm_variants_fold_and_slice(trans_b, attrs, bias_shape):
    rng = np.random.default_rng(5)
    w1, b1 = weights(rng, 6, 8)
    w2, b2 = weights(rng, 8, 3)
    w1[:, 3] = 0.0
    b1[3] = 1.5
    w2[6, :] = 0.0
    b = GraphBuilder()
    h = b.op("Sigmoid", [b.gemm("x", w1, b1)])
    if bias_shape is None:
        y = b.gemm(h, w2, None, trans_b=trans_b, **attrs)
    else:
        c = np.full(bias_shape, 0.25, np.float32) if bias_shape == () else b2[: int(np.prod(bias_shape))]
        y = b.op("Gemm", [h, b.const(w2.T.copy() if trans_b else w2), b.const(np.asarray(c, np.float32).reshape(bias_shape))],
                 transB=trans_b, **attrs)
    result = _minimize(b.model(y))
    assert _widths(result)[result.report["layers"][1]["node"]] == (6, 3)


def test_matmul_without_bias_gets_fold_add():
    params = _mlp([6, 8, 3])
    params[0][0][:, 2] = 0.0
    params[0][1][2] = 0.6
    b = GraphBuilder()
    h = b.op("Relu", [b.linear_matmul("x", *params[0])])
    y = b.linear_matmul(h, params[1][0], None)
    result = _minimize(b.model(y))
    assert [n.op_type for n in result.model.graph.node].count("Add") == 2


def test_matmul_output_with_two_readers_gets_fold_add():
    params = _mlp([6, 8, 3])
    params[0][0][:, 2] = 0.0
    params[0][1][2] = 0.6
    b = GraphBuilder()
    h = b.op("Relu", [b.linear_matmul("x", *params[0])])
    m = b.op("MatMul", [h, b.const(params[1][0])])
    y1 = b.op("Add", [m, b.const(params[1][1])])
    y2 = b.op("Tanh", [m])
    result = _minimize(b.model([y1, y2]))
    assert _layer(result, 1)["folded_constants"]


def test_matmul_on_sequence_input():
    params = _mlp([6, 8, 3])
    params[0][0][:, [1, 4]] = 0.0
    params[0][1][4] = -0.5
    result = _minimize(_chain(params, layout="matmul", act="Gelu" if False else "Elu", input_shape=("N", "T", 6)))
    assert _layer(result, 0)["removed_output_units"] == [1, 4]


def test_whole_dead_layer_keeps_batch():
    params = _mlp([6, 8, 8, 3])
    params[1][0][:] = 0.0
    params[1][1][:] = [0.1, -0.2, 0, 0.3, 0, 0, 0.5, -1]
    model = _chain(params)
    result = _minimize(model)
    for tensor in result.model.graph.initializer:
        assert 0 not in tensor.dims
    inferred = onnx.shape_inference.infer_shapes(result.model)
    for value in inferred.graph.value_info:
        assert all(d.dim_value != 0 for d in value.type.tensor_type.shape.dim if d.HasField("dim_value"))
    assert_same_outputs(model, result.model, batches=(1, 7))
    assert result.model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert float_params(result.model) < float_params(model) / 3


def test_shared_initializer_is_copied_not_sliced():
    # One weight W read by two Gemms that lose different units: the first use keeps rows
    # 0-2 (its units 3-5 are read by no layer), the second keeps rows 4-5 and columns 0-2.
    rng = np.random.default_rng(11)
    w, bias = weights(rng, 6, 6)
    w[3:, :] = 0.0  # columns 3-5 of W in [out, in] form: the second use ignores h1 units 3-5
    w_out, b_out = weights(rng, 6, 3)
    w_out[3:, :] = 0.0  # ...and so does the head reading h1
    w_out2, b_out2 = weights(rng, 6, 3)
    w_out2[:4, :] = 0.0  # h2 units 0-3 are read by no layer
    b = GraphBuilder()
    shared_w, shared_b = b.const(w.T.copy(), "shared_W"), b.const(bias, "shared_b")
    h1 = b.op("Relu", [b.op("Gemm", ["x", shared_w, shared_b], transB=1)])
    h2 = b.op("Relu", [b.op("Gemm", [h1, shared_w, shared_b], transB=1)])
    y = b.op("Add", [b.gemm(h2, w_out2, b_out2), b.gemm(h1, w_out, None)])
    model = b.model(y)
    result = _minimize(model)

    shapes = sorted(list(s) for s in initializer_shapes(result.model).values() if len(s) == 2)
    assert [3, 6] in shapes
    assert [2, 3] in shapes
    assert shared_w not in initializer_shapes(result.model) or initializer_shapes(result.model)[shared_w] != [6, 6]
    assert float_params(result.model) < float_params(model)


def test_growing_copies_not_made():
    # Removing one unit from only one use of a shared weight would copy it whole.
    rng = np.random.default_rng(11)
    w, bias = weights(rng, 6, 6)
    w_out, b_out = weights(rng, 6, 3)
    w_out2 = w_out.copy()
    w_out2[2, :] = 0.0
    b = GraphBuilder()
    shared_w, shared_b = b.const(w.T.copy(), "shared_W"), b.const(bias, "shared_b")
    h1 = b.op("Relu", [b.op("Gemm", ["x", shared_w, shared_b], transB=1)])
    h2 = b.op("Relu", [b.op("Gemm", [h1, shared_w, shared_b], transB=1)])
    model = b.model(b.op("Add", [b.gemm(h2, w_out2, b_out), b.gemm(h1, w_out, None)]))
    result = onnx_squeeze.minimize(model)
    assert not result.changed
    assert float_params(result.model) == float_params(model)


def test_graph_output_unit_is_kept_even_if_constant():
    params = _mlp([6, 8, 3])
    params[1][0][:, 1] = 0.0
    result = onnx_squeeze.minimize(_chain(params))
    assert not result.changed
    assert any("graph output" in r.reason for r in result.refusals)


def test_residual_add_dead_on_one_side_is_kept():
    rng = np.random.default_rng(2)
    (w1, b1), (w2, b2), (w3, b3) = weights(rng, 6, 8), weights(rng, 8, 8), weights(rng, 8, 3)
    w1[:, 2] = 0.0
    b1[2] = 0.0  # dead on both sides
    w2[:, 2] = 0.0
    b2[2] = 0.0
    w2[:, 5] = 0.0
    b2[5] = 0.0  # dead only in the branch
    b = GraphBuilder()
    s = b.op("Relu", [b.gemm("x", w1, b1)])
    r = b.op("Add", [s, b.gemm(s, w2, b2)])
    result = _minimize(b.model(b.gemm(r, w3, b3)))
    assert _layer(result, 0)["removed_output_units"] == [2]
    assert _layer(result, 1)["removed_output_units"] == [2]
    assert _layer(result, 2)["removed_input_units"] == [2]


def test_concat_offsets_and_constant_column():
    rng = np.random.default_rng(4)
    (wl, bl), (wm, bm), (wm2, bm2), (wh, bh) = weights(rng, 10, 3), weights(rng, 10, 8), weights(rng, 8, 1), weights(rng, 4, 1)
    wl[:, 1] = 0.0
    bl[1] = 0.2
    wm[:, 5] = 0.0
    bm[5] = 0.0
    b = GraphBuilder(input_shape=("N", 10))
    lin = b.gemm("x", wl, bl)
    mlp = b.gemm(b.op("Relu", [b.gemm("x", wm, bm)]), wm2, bm2)
    h = b.op("Concat", [lin, mlp], axis=-1)
    result = _minimize(b.model(b.op("Sigmoid", [b.gemm(h, wh, bh)])))
    head = next(layer for layer in result.report["layers"] if layer["shape_before"] == [1, 4])
    assert head["removed_input_units"] == [1]
    assert head["shape_after"] == [1, 3]


def test_concat_of_tensor_with_itself():
    params = _mlp([6, 6, 3])
    w2 = np.concatenate([params[1][0], params[1][0] * 0.5])
    params[0][0][:, 3] = 0.0
    params[0][1][3] = 0.0
    b = GraphBuilder()
    y = b.op("Relu", [b.gemm("x", *params[0])])
    c = b.op("Concat", [y, y], axis=1)
    result = _minimize(b.model(b.gemm(c, w2, params[1][1])))
    assert result.report["layers"][1]["removed_input_units"] == [3, 9]
    assert [n for n in result.model.graph.node if n.op_type == "Concat"][0].input[0] == \
        [n for n in result.model.graph.node if n.op_type == "Concat"][0].input[1]


def test_gather_indices_remapped():
    params = _mlp([6, 8, 3])
    params[0][0][:, [0, 4]] = 0.0
    params[0][1][[0, 4]] = 0.0
    b = GraphBuilder()
    h = b.op("Relu", [b.gemm("x", *params[0])])
    g = b.op("Gather", [h, b.const(np.array([0, 2, 4, 5, 7, 1, 3, 6], np.int64))], axis=1)
    result = _minimize(b.model(b.gemm(g, params[1][0], params[1][1])))
    assert result.report["layers"][0]["removed_output_units"] == [0, 4]


def test_prune_inputs_inserts_gather_and_keeps_interface():
    params = _mlp([6, 8, 3])
    params[0][0][[1, 5], :] = 0.0  # input features 1 and 5 are read by no layer
    model = _chain(params)
    plain = onnx_squeeze.minimize(model)
    assert not plain.changed
    assert any("--prune-inputs" in r.reason for r in plain.refusals)

    result = _minimize(model, prune_inputs=True)
    assert result.model.graph.node[0].op_type == "Gather"
    assert result.model.graph.input[0] == model.graph.input[0]
    assert _layer(result, 0)["removed_input_units"] == [1, 5]


def test_prune_inputs_after_flatten():
    params = _mlp([6, 8, 3])
    params[0][0][[0, 2], :] = 0.0
    b = GraphBuilder(input_shape=("N", 1, 2, 3))
    h = b.op("Flatten", ["x"], axis=1)
    for i, (w, bias) in enumerate(params):
        h = b.gemm(h, w, bias)
        if i == 0:
            h = b.op("Relu", [h])
    result = _minimize(b.model(h), prune_inputs=True)
    assert [n.op_type for n in result.model.graph.node][:2] == ["Flatten", "Gather"]


def test_known_zero_times_live_gate_stays_dead():
    params = _mlp([6, 8, 3])
    params[0][0][:, 6] = 0.0
    params[0][1][6] = -2.0  # relu gives exactly 0
    b = GraphBuilder()
    h = b.op("Relu", [b.gemm("x", *params[0])])
    gate = b.op("Sigmoid", [b.gemm("x", *weights(np.random.default_rng(9), 6, 1))])
    result = _minimize(b.model(b.gemm(b.op("Mul", [h, gate]), *params[1])))
    assert _layer(result, 0)["removed_output_units"] == [6]


def test_original_model_is_not_mutated():
    params = _mlp([6, 8, 3])
    params[0][0][:, 2] = 0.0
    model = _chain(params)
    before = model.SerializeToString()
    onnx_squeeze.minimize(model)
    assert model.SerializeToString() == before


def test_report_and_provenance_fields():
    params = _mlp([6, 8, 3])
    params[0][0][:, 2] = 0.0
    result = onnx_squeeze.minimize(_chain(params))
    for key in ("params_before", "params_after", "nonzero_before", "nonzero_after", "macs_before",
                "macs_after", "bytes_before", "bytes_after", "max_abs_error", "max_rel_error", "verified"):
        assert key in result.report
    assert result.report["params_after"] == result.report["params_before"] - 6 - 1 - 3
    assert result.report["macs_after"] == result.report["macs_before"] - 6 - 3
    props = {p.key: p.value for p in result.model.metadata_props}
    assert '"params_after"' in props["onnx_squeeze"]


def test_outputs_match_user_inputs():
    params = _mlp([6, 8, 3])
    params[0][0][:, 2] = 0.0
    model = _chain(params)
    feeds = seeded_feeds(model, 4, seed=99)
    result = onnx_squeeze.minimize(model, inputs=feeds)
    assert len(result.verification.cases) == 3
    np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0], atol=1e-5)


@pytest.mark.parametrize("op_type", ["Gemm", "Conv"])
def test_empty_optional_bias_slot_gets_fold(op_type):
    rng = np.random.default_rng(13)
    w1, b1 = weights(rng, 6, 8)
    w1[:, 3] = 0.0
    b1[3] = 0.9
    w2, _ = weights(rng, 8, 3)
    b = GraphBuilder() if op_type == "Gemm" else GraphBuilder(input_shape=("N", 6, 4, 4))
    if op_type == "Gemm":
        h = b.op("Relu", [b.gemm("x", w1, b1)])
        y = b.op("Gemm", [h, b.const(w2.T.copy()), ""], transB=1)
    else:
        h = b.op("Relu", [b.op("Conv", ["x", b.const(w1.T.reshape(8, 6, 1, 1).copy()), b.const(b1)], kernel_shape=[1, 1])])
        y = b.op("Conv", [h, b.const(w2.T.reshape(3, 8, 1, 1).copy()), ""], kernel_shape=[1, 1])
    result = _minimize(b.model(y))
    last = result.model.graph.node[-1]
    assert len(last.input) == 3
    assert last.input[2]


def test_gemm_beta_zero_ignored_bias_is_sliced():
    rng = np.random.default_rng(14)
    w1, b1 = weights(rng, 6, 8)
    w2, b2 = weights(rng, 8, 4)
    w3, b3 = weights(rng, 4, 3)
    w3[1, :] = 0.0  # unit 1 of the beta=0 Gemm is read by no layer
    b = GraphBuilder()
    h = b.op("Relu", [b.gemm("x", w1, b1)])
    h = b.op("Relu", [b.gemm(h, w2, b2, beta=0.0)])
    result = _minimize(b.model(b.gemm(h, w3, b3)))
    gemm = next(layer for layer in result.report["layers"] if layer["shape_before"] == [4, 8])
    assert gemm["removed_output_units"] == [1]
