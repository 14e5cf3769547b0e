"""One test per refusal rule: the units stay, outputs are unchanged, and the reason names the
node or tensor that stopped the analysis."""

from __future__ import annotations

import numpy as np
import onnx

import onnx_squeeze
from builders import GraphBuilder, assert_same_outputs, initializer_shapes, weights


def _dead_hidden_model(between, *, input_shape=("N", 6), dead=(2,), opset=17):
    """Gemm(6 -> 8) -> Relu -> between(h) -> Gemm(8 -> 3) with the listed hidden units dead."""
    rng = np.random.default_rng(1)
    w1, b1 = weights(rng, 6, 8)
    w2, b2 = weights(rng, 8, 3)
    for unit in dead:
        w1[:, unit] = 0.0
        b1[unit] = 0.3
    b = GraphBuilder(input_shape=input_shape, opset=opset)
    h = b.op("Relu", [b.gemm("x", w1, b1) if len(input_shape) == 2 else b.linear_matmul("x", w1, b1)])
    h = between(b, h)
    y = b.gemm(h, w2, b2) if len(input_shape) == 2 else b.linear_matmul(h, w2, b2)
    return b.model(y)


def _assert_kept(model, reason_part):
    result = onnx_squeeze.minimize(model)
    assert result.verification.passed
    assert not result.changed
    assert_same_outputs(model, result.model)
    reasons = [r.reason for r in result.refusals]
    assert any(reason_part in reason for reason in reasons), reasons
    return result


def test_unsupported_op_is_barrier():
    model = _dead_hidden_model(lambda b, h: b.op("Softmax", [h], axis=-1))
    _assert_kept(model, "Softmax is not supported")


def test_custom_domain_op_is_barrier():
    model = _dead_hidden_model(lambda b, h: b.op("Relu", [h]))
    node = model.graph.node[2]
    node.domain = "com.example"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    result = onnx_squeeze.minimize(model, verify_outputs=False)
    assert not result.changed
    assert any("custom-domain op com.example::Relu" in r.reason for r in result.refusals)


def test_cast_to_integer_is_barrier():
    def between(b, h):
        return b.op("Cast", [b.op("Cast", [h], to=onnx.TensorProto.INT32)], to=onnx.TensorProto.FLOAT)

    _assert_kept(_dead_hidden_model(between), "Cast to a non-float type")


def test_runtime_reshape_is_barrier():
    # The target comes from a second graph input, so no static dims can explain it.
    def between(b, h):
        b.inputs.append(onnx.helper.make_tensor_value_info("target", onnx.TensorProto.INT64, [2]))
        return b.op("Reshape", [h, "target"])

    model = _dead_hidden_model(between)
    result = onnx_squeeze.minimize(model, verify_outputs=False)
    assert not result.changed
    assert any("Reshape with a shape computed at run time" in r.reason for r in result.refusals)


def test_shape_computed_reshape_is_folded():
    # x.view(x.size(0), 8) as exporters write it: Shape -> Slice -> Concat -> Reshape.
    def between(b, h):
        batch = b.op("Slice", [b.op("Shape", [h]), b.const(np.array([0])), b.const(np.array([1]))])
        return b.op("Reshape", [h, b.op("Concat", [batch, b.const(np.array([8]))], axis=0)])

    model = _dead_hidden_model(between)
    result = onnx_squeeze.minimize(model)
    assert result.changed
    assert "Shape" not in [n.op_type for n in result.model.graph.node]
    assert_same_outputs(model, result.model)


def test_shape_reader_is_barrier():
    # A Shape node reads the channel count, so the tensor it reads must keep all channels.
    model = _dead_hidden_model(lambda b, h: b.op("Relu", [h]))
    hidden = model.graph.node[1].output[0]
    model.graph.node.append(onnx.helper.make_node("Shape", [hidden], ["hidden_shape"], name="read_shape"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("hidden_shape", onnx.TensorProto.INT64, [2]))
    _assert_kept(model, "node 'read_shape' (Shape): Shape reads the channel count")


def test_constant_varying_along_other_axis_blocks_fold():
    # [T, F] constant added to [N, T, F]: unit 2 is no longer one constant across tokens.
    pos = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    model = _dead_hidden_model(lambda b, h: b.op("Add", [h, b.const(pos)]), input_shape=("N", 4, 6))
    result = onnx_squeeze.minimize(model)
    assert not result.changed
    assert_same_outputs(model, result.model)


def test_non_finite_constant_is_kept():
    # 1 / relu(-x) with a dead unit of bias -0.3: relu gives 0 and the constant is +inf.
    model = _dead_hidden_model(lambda b, h: b.op("Reciprocal", [b.op("Add", [h, b.const(np.float32(0.0))])]))
    model.graph.initializer[1].CopyFrom(
        onnx.numpy_helper.from_array(np.where(np.arange(8) == 2, -0.3, 0.3).astype(np.float32), model.graph.initializer[1].name)
    )
    result = onnx_squeeze.minimize(model, verify_outputs=False)
    second_weight = model.graph.node[-1].input[1]
    assert initializer_shapes(result.model)[second_weight] == [3, 8]


def test_graph_input_kept_without_prune_inputs():
    rng = np.random.default_rng(0)
    w1, b1 = weights(rng, 6, 3)
    w1[4, :] = 0.0
    b = GraphBuilder()
    model = b.model(b.gemm("x", w1, b1))
    _assert_kept(model, "is a graph input (use --prune-inputs")


def test_dead_graph_output_unit_is_kept():
    rng = np.random.default_rng(0)
    w1, b1 = weights(rng, 6, 3)
    w1[:, 1] = 0.0
    b = GraphBuilder()
    model = b.model(b.gemm("x", w1, b1))
    _assert_kept(model, "is a graph output")


def test_constant_first_matmul_operand_is_barrier():
    def between(b, h):
        # (h^T)^T through a constant left operand: W @ h^T
        t = b.op("Transpose", [h], perm=[1, 0])
        return b.op("Transpose", [b.op("MatMul", [b.const(np.eye(8, dtype=np.float32)), t])], perm=[1, 0])

    _assert_kept(_dead_hidden_model(between), "MatMul with a constant first operand")


def test_operand_from_barrier_pins_units():
    # h + 0 * softmax(g): the softmax output cannot shrink, so neither can h, whose units
    # the Add ties to it, although h's dead unit is a constant.
    rng = np.random.default_rng(8)

    def between(b, h):
        z = b.op("Softmax", [b.gemm("x", *weights(rng, 6, 8))], axis=-1)
        return b.op("Add", [h, b.op("Mul", [z, b.const(np.float32(0.0))])])

    _assert_kept(_dead_hidden_model(between), "(Softmax): Softmax is not supported")


def test_tensor_read_inside_if_body_is_kept():
    # The then-branch reads h from the outer scope; it runs only when max(x) > 10, which the
    # random check inputs never reach, so only the analysis can protect it.
    model = _dead_hidden_model(lambda b, h: b.op("Relu", [h]))
    hidden = model.graph.node[1].output[0]
    vi = onnx.helper.make_tensor_value_info
    axes = onnx.numpy_helper.from_array(np.array([1], np.int64), "axes_then")
    then_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("ReduceSum", [hidden, "axes_then"], ["side_then"], keepdims=1)],
        "then", [], [vi("side_then", onnx.TensorProto.FLOAT, None)], [axes])
    axes_else = onnx.numpy_helper.from_array(np.array([1], np.int64), "axes_else")
    else_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("ReduceSum", ["x", "axes_else"], ["side_else"], keepdims=1)],
        "else", [], [vi("side_else", onnx.TensorProto.FLOAT, None)], [axes_else])
    output = model.graph.output[0].name
    model.graph.output[0].name = "main"
    model.graph.node[-1].output[0] = "main"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(10, np.float32), "ten"))
    model.graph.node.extend([
        onnx.helper.make_node("ReduceMax", ["x"], ["max_x"], keepdims=0),
        onnx.helper.make_node("Greater", ["max_x", "ten"], ["condition"]),
        onnx.helper.make_node("If", ["condition"], ["side"], then_branch=then_branch, else_branch=else_branch),
        onnx.helper.make_node("Add", ["main", "side"], [output]),
    ])
    model.graph.output[0].name = output
    onnx.checker.check_model(model)

    result = onnx_squeeze.minimize(model)
    assert not result.changed
    assert any("is read inside the body of node" in r.reason for r in result.refusals)
