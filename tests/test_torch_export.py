"""End-to-end tests on fully-connected torch models exported by both torch ONNX exporters.

Every test builds a small model, fills its parameters from a seeded source and then zeros
chosen rows or columns, because random weights have almost no dead units. It exports the
model with the TorchScript exporter (``dynamo=False``) and with the torch.export-based one
(``dynamo=True``), minimizes the export, and checks the structure of the result and its
outputs in onnxruntime.

Layouts written by torch 2.13 (checked by the op-type asserts below): a Linear with a bias on
2-D input becomes ``Gemm(transB=1)`` with the weight ``[out, in]``. On 3-D input it becomes
``MatMul`` with a transposed ``[in, out]`` weight, plus an ``Add`` of the bias. A Linear
without a bias on 2-D input becomes ``MatMul`` under the TorchScript exporter and ``Gemm``
without C under the new one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnx_squeeze

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")  # the dynamo exporter translates through onnxscript
from torch import nn  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
    pytest.mark.filterwarnings("ignore:The feature will be removed"),
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
]

ATOL = 1e-5
BATCH_SIZES = (1, 3)
SEED = 0
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


# ---------------------------------------------------------------------------------------------
# Export, minimize, inspect


@pytest.fixture(params=["torchscript", "dynamo"])
def export(request, tmp_path):
    """Return ``export(model, example, opset=17) -> onnx.ModelProto`` for one exporter.

    The input is named ``x`` and the output ``y``, both with a symbolic batch dim ``batch``.
    The dynamo exporter writes ``<path>.data`` beside the model, and ``onnx.load`` reads it.
    """
    use_dynamo = request.param == "dynamo"
    counter = itertools.count()

    def run(model: nn.Module, example: torch.Tensor, opset: int = 17) -> onnx.ModelProto:
        path = tmp_path / f"model_{next(counter)}.onnx"
        model.eval()
        if use_dynamo:
            torch.onnx.export(
                model, (example,), path, dynamo=True, opset_version=opset,
                input_names=["x"], output_names=["y"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
            )
        else:
            torch.onnx.export(
                model, (example,), path, dynamo=False, opset_version=opset,
                input_names=["x"], output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            )
        return onnx.load(path)

    run.dynamo = use_dynamo
    return run


def seeded(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Fill every parameter of ``model`` with seeded normal values (std 0.5)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def example_input(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(SEED + 1))


def minimize(model: onnx.ModelProto) -> onnx_squeeze.MinimizeResult:
    """Run ``onnx_squeeze.minimize`` and check that it left its argument untouched."""
    before = model.SerializeToString()
    result = onnx_squeeze.minimize(model)
    assert model.SerializeToString() == before, "minimize() modified its argument"
    return result


@dataclass
class WeightOp:
    """A Gemm or MatMul node with a constant weight, whose ``matrix`` is in [out, in] orientation."""

    node: str
    op_type: str
    weight: str
    stored_shape: tuple[int, ...]
    matrix: np.ndarray
    bias: np.ndarray | None


def weight_ops(model: onnx.ModelProto) -> list[WeightOp]:
    """List the weight ops of ``model`` in graph order, reading weights through Identity nodes."""
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    identity_source = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}

    def resolve(name: str) -> str:
        while name in identity_source:
            name = identity_source[name]
        return name

    ops = []
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight_name = resolve(node.input[1])
        if weight_name not in constants:
            continue
        weight = constants[weight_name]
        bias = None
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            matrix = weight if trans_b else weight.T
            if len(node.input) > 2 and node.input[2]:
                bias = constants.get(resolve(node.input[2]))
        else:
            matrix = weight.T
        ops.append(WeightOp(node.name, node.op_type, weight_name, tuple(weight.shape), matrix, bias))
    return ops


def match_linears(
    original: onnx.ModelProto, minimized: onnx.ModelProto, linears: dict[str, nn.Linear]
) -> dict[str, list[tuple[WeightOp, WeightOp | None]]]:
    """Pair each weight op of ``original`` with its torch Linear (by weight value) and its rewrite.

    The rewrite is the node of ``minimized`` with the same name, or None when it is gone. A
    Linear used twice, or two Linears tied to one Parameter, gets one pair per use.
    """
    rewritten = {op.node: op for op in weight_ops(minimized)}
    pairs: dict[str, list[tuple[WeightOp, WeightOp | None]]] = {name: [] for name in linears}
    for op in weight_ops(original):
        name = next(
            (name for name, linear in linears.items()
             if op.matrix.shape == tuple(linear.weight.shape)
             and np.array_equal(op.matrix, linear.weight.detach().numpy())),
            None,
        )
        assert name is not None, f"the weight of node '{op.node}' matches no torch Linear"
        pairs[name].append((op, rewritten.get(op.node)))
    return pairs


def count_parameters(model: onnx.ModelProto) -> int:
    """Count the floating-point elements of initializers and of ``Constant`` nodes.

    The TorchScript exporter writes scalars such as GELU's 1/sqrt(2) as ``Constant`` nodes,
    which the minimizer may turn into initializers. Counting both keeps the figure independent
    of that representation.
    """
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in FLOAT_TYPES)
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for attribute in node.attribute:
            if attribute.name == "value" and attribute.t.data_type in FLOAT_TYPES:
                total += int(np.prod(attribute.t.dims))
            elif attribute.name == "value_float":
                total += 1
            elif attribute.name == "value_floats":
                total += len(attribute.floats)
    return total


def seeded_feeds(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    """Build seeded inputs for every graph input, with each symbolic dim set to ``batch``."""
    rng = np.random.default_rng(SEED + 100 * batch)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[value.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_outputs(original: onnx.ModelProto, minimized: onnx.ModelProto, batch_sizes=BATCH_SIZES) -> None:
    names = [o.name for o in original.graph.output]
    for batch in batch_sizes:
        feeds = seeded_feeds(original, batch)
        expected = run_onnxruntime(original, feeds)
        actual = run_onnxruntime(minimized, feeds)
        for name, want, got in zip(names, expected, actual):
            assert got.shape == want.shape, f"batch {batch}: output '{name}' has shape {got.shape}, expected {want.shape}"
            assert np.isfinite(want).all(), f"batch {batch}: the original model outputs NaN or Inf in '{name}'"
            np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"batch {batch}, output '{name}'")


def assert_interface_unchanged(original: onnx.ModelProto, minimized: onnx.ModelProto) -> None:
    assert [v.name for v in minimized.graph.input] == [v.name for v in original.graph.input]
    assert [v.name for v in minimized.graph.output] == [v.name for v in original.graph.output]
    # ``type`` carries the dtype and every dim, symbolic names included.
    assert [v.type for v in minimized.graph.input] == [v.type for v in original.graph.input]
    assert [v.type for v in minimized.graph.output] == [v.type for v in original.graph.output]
    assert minimized.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert minimized.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert list(minimized.opset_import) == list(original.opset_import)


def assert_report_matches_model(original: onnx.ModelProto, result: onnx_squeeze.MinimizeResult) -> None:
    """Check that every report entry names a node of both models and gives its true weight shapes."""
    before = {op.node: op for op in weight_ops(original)}
    after = {op.node: op for op in weight_ops(result.model)}
    for entry in result.report["layers"]:
        assert entry["node"] in before, f"report entry for unknown node '{entry['node']}'"
        assert entry["node"] in after, f"report entry for node '{entry['node']}' that is not in the minimized model"
        assert tuple(entry["shape_before"]) == before[entry["node"]].stored_shape, entry
        assert tuple(entry["shape_after"]) == after[entry["node"]].stored_shape, entry


def assert_minimized(
    original: onnx.ModelProto,
    result: onnx_squeeze.MinimizeResult,
    layers: dict[str, list[tuple[WeightOp, WeightOp | None]]],
    expected_shapes: dict[str, list[tuple[int, int]]],
    params_removed: int,
) -> None:
    """Check everything an exact minimization promises, for shapes given as [out, in] per use."""
    assert result.changed
    assert result.verification is not None
    assert result.verification.passed, result.verification.message

    assert_same_outputs(original, result.model)
    assert_interface_unchanged(original, result.model)
    onnx.checker.check_model(result.model, full_check=True)

    shapes = {name: [None if after is None else after.matrix.shape for _, after in uses] for name, uses in layers.items()}
    assert shapes == expected_shapes
    for name, uses in layers.items():
        for before, after in uses:
            assert after is not None, f"the node of '{name}' is gone"
            assert after.op_type == before.op_type, f"'{name}' changed from {before.op_type} to {after.op_type}"
    assert_report_matches_model(original, result)

    assert count_parameters(original) - count_parameters(result.model) == params_removed

    again = onnx_squeeze.minimize(result.model, verify_outputs=False)
    assert not again.changed, f"a second run removed more: {again.report['layers']}"

    # The report's figures come last so that a counting difference does not hide the checks above.
    assert result.report["params_before"] - result.report["params_after"] == params_removed
    assert result.report["params_before"] == count_parameters(original)


def op_types(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


# ---------------------------------------------------------------------------------------------
# Models


class ScaleShift(nn.Module):
    """``x * scale + shift`` with per-unit buffers (seeded, scale in [0.5, 1.5))."""

    def __init__(self, width: int):
        super().__init__()
        generator = torch.Generator().manual_seed(SEED + 2)
        self.register_buffer("scale", 0.5 + torch.rand(width, generator=generator))
        self.register_buffer("shift", torch.randn(width, generator=generator))

    def forward(self, x):
        return x * self.scale + self.shift


class MLP(nn.Module):
    """``fc2(hidden(fc1(x)))`` with 5 inputs, 8 hidden units and 3 outputs."""

    def __init__(self, hidden: nn.Module, first_bias: bool = True, second_bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(5, 8, bias=first_bias)
        self.hidden = hidden
        self.fc2 = nn.Linear(8, 3, bias=second_bias)

    def forward(self, x):
        return self.fc2(self.hidden(self.fc1(x)))

    def linears(self) -> dict[str, nn.Linear]:
        return {"fc1": self.fc1, "fc2": self.fc2}


class DeepMLP(nn.Module):
    """Four Linears 6 -> 8 -> 8 -> 6 -> 3 with ReLU between them."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.l1(x))
        x = torch.relu(self.l2(x))
        x = torch.relu(self.l3(x))
        return self.l4(x)

    def linears(self) -> dict[str, nn.Linear]:
        return {"l1": self.l1, "l2": self.l2, "l3": self.l3, "l4": self.l4}


class ConcatBranches(nn.Module):
    """``sigmoid(head(cat([lin(x), mlp(x)], -1)))``: two branches of widths 3 and 1 into one head."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 3)
        self.mlp = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 1))
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return torch.sigmoid(self.head(torch.cat([self.lin(x), self.mlp(x)], dim=-1)))

    def linears(self) -> dict[str, nn.Linear]:
        return {"lin": self.lin, "mlp_in": self.mlp[0], "mlp_out": self.mlp[2], "head": self.head}


class SharedMLP(nn.Module):
    """``fc_out(relu(second(relu(first(relu(fc_in(x)))))))`` where first and second share a weight.

    ``sharing="reuse"`` calls one Linear twice, so weight and bias are shared.
    ``sharing="tied"`` uses two Linears tied to one weight Parameter, each with its own bias.
    """

    def __init__(self, sharing: str):
        super().__init__()
        self.fc_in = nn.Linear(6, 8)
        self.first = nn.Linear(8, 8)
        if sharing == "reuse":
            self.second = self.first
        else:
            self.second = nn.Linear(8, 8)
            self.second.weight = self.first.weight
        self.fc_out = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.fc_in(x))
        x = torch.relu(self.first(x))
        x = torch.relu(self.second(x))
        return self.fc_out(x)


# ---------------------------------------------------------------------------------------------
# Linear layouts: Gemm on 2-D input, MatMul + Add on 3-D input, with and without bias

DEAD_ROWS = [2, 5]
DEAD_BIASES = [0.4, -0.3]  # ReLU makes them the constants 0.4 and 0
KEPT_ROWS = [0, 1, 3, 4, 6, 7]

BIAS_CASES = [
    # fc1 loses 2 rows of 5 weights, fc2 2 columns of 3: 10 + 6 = 16, plus 2 fc1 biases.
    pytest.param(True, True, 18, id="bias"),
    pytest.param(False, False, 16, id="no_bias"),
    # The constant 0.4 is folded into fc2, which has no bias, so a 3-element bias is added.
    pytest.param(True, False, 18 - 3, id="bias_first_only"),
]


def dead_unit_mlp(first_bias: bool, second_bias: bool) -> MLP:
    model = seeded(MLP(nn.ReLU(), first_bias, second_bias))
    with torch.no_grad():
        model.fc1.weight[DEAD_ROWS] = 0.0
        if first_bias:
            model.fc1.bias[DEAD_ROWS] = torch.tensor(DEAD_BIASES)
    return model


def assert_kept_weights(model: MLP, layers) -> None:
    """Check that fc1 keeps rows KEPT_ROWS and fc2 the matching columns, values unchanged."""
    fc1_after = layers["fc1"][0][1].matrix
    fc2_after = layers["fc2"][0][1].matrix
    np.testing.assert_array_equal(fc1_after, model.fc1.weight.detach().numpy()[KEPT_ROWS])
    np.testing.assert_array_equal(fc2_after, model.fc2.weight.detach().numpy()[:, KEPT_ROWS])


@pytest.mark.parametrize("first_bias, second_bias, params_removed", BIAS_CASES)
def test_linear_2d_dead_units(export, first_bias, second_bias, params_removed):
    model = dead_unit_mlp(first_bias, second_bias)
    original = export(model, example_input(2, 5))
    result = minimize(original)
    layers = match_linears(original, result.model, model.linears())

    # TorchScript writes a Linear without bias on 2-D input as MatMul, the dynamo exporter as Gemm.
    for name, has_bias in (("fc1", first_bias), ("fc2", second_bias)):
        expected_op = "Gemm" if has_bias or export.dynamo else "MatMul"
        assert layers[name][0][0].op_type == expected_op
    assert_minimized(original, result, layers, {"fc1": [(6, 5)], "fc2": [(3, 6)]}, params_removed)
    assert_kept_weights(model, layers)


@pytest.mark.parametrize("first_bias, second_bias, params_removed", BIAS_CASES)
def test_linear_3d_dead_units(export, first_bias, second_bias, params_removed):
    model = dead_unit_mlp(first_bias, second_bias)
    original = export(model, example_input(2, 4, 5))
    result = minimize(original)
    layers = match_linears(original, result.model, model.linears())

    for name in ("fc1", "fc2"):
        assert layers[name][0][0].op_type == "MatMul"
    if first_bias:
        assert "Add" in op_types(original)
    assert_minimized(original, result, layers, {"fc1": [(6, 5)], "fc2": [(3, 6)]}, params_removed)
    assert_kept_weights(model, layers)
    # MatMul stores the weight as [in, out].
    assert layers["fc1"][0][1].stored_shape == (5, 6)
    assert layers["fc2"][0][1].stored_shape == (6, 3)


# ---------------------------------------------------------------------------------------------
# Dead hidden units through every activation that maps to the element-wise ops


HIDDEN_DEAD_ROWS = [1, 4, 6]
HIDDEN_DEAD_BIASES = [0.7, -0.9, 0.0]  # positive, negative and zero pre-activation constants
HIDDEN_KEPT_ROWS = [0, 2, 3, 5, 7]

HIDDEN_LAYERS = [
    # factory, opset, an op the export must contain (None: not checked), per-unit constant tensors
    pytest.param(nn.ReLU, 17, "Relu", 0, id="relu"),
    pytest.param(lambda: nn.LeakyReLU(0.1), 17, "LeakyRelu", 0, id="leaky_relu"),
    pytest.param(lambda: nn.PReLU(num_parameters=8), 17, "PRelu", 1, id="prelu"),
    pytest.param(lambda: nn.ELU(alpha=0.7), 17, "Elu", 0, id="elu"),
    pytest.param(nn.SELU, 17, "Selu", 0, id="selu"),
    pytest.param(lambda: nn.CELU(alpha=0.8), 17, "Celu", 0, id="celu"),
    pytest.param(nn.Sigmoid, 17, "Sigmoid", 0, id="sigmoid"),
    pytest.param(nn.Hardsigmoid, 17, "HardSigmoid", 0, id="hardsigmoid"),
    pytest.param(nn.Tanh, 17, "Tanh", 0, id="tanh"),
    pytest.param(nn.Softplus, 17, "Softplus", 0, id="softplus"),
    pytest.param(nn.Softsign, 17, None, 0, id="softsign"),
    pytest.param(nn.Mish, 17, None, 0, id="mish"),
    pytest.param(nn.GELU, 17, "Erf", 0, id="gelu"),
    pytest.param(lambda: nn.GELU(approximate="tanh"), 17, "Tanh", 0, id="gelu_tanh"),
    pytest.param(nn.GELU, 20, "Gelu", 0, id="gelu_opset20"),
    pytest.param(lambda: nn.GELU(approximate="tanh"), 20, "Gelu", 0, id="gelu_tanh_opset20"),
    pytest.param(nn.SiLU, 17, "Sigmoid", 0, id="silu"),
    pytest.param(nn.Hardswish, 17, "HardSwish", 0, id="hardswish"),
    pytest.param(nn.ReLU6, 17, "Clip", 0, id="relu6"),
    pytest.param(nn.Identity, 17, None, 0, id="identity"),
    pytest.param(lambda: nn.Dropout(0.3), 17, None, 0, id="dropout_eval"),
    pytest.param(lambda: nn.Sequential(nn.ReLU(), ScaleShift(8)), 17, "Mul", 2, id="relu_scale_shift"),
]


@pytest.mark.parametrize("make_hidden, opset, required_op, per_unit_tensors", HIDDEN_LAYERS)
def test_activation_dead_units_folded(export, make_hidden, opset, required_op, per_unit_tensors):
    model = seeded(MLP(make_hidden()))
    with torch.no_grad():
        model.fc1.weight[HIDDEN_DEAD_ROWS] = 0.0
        model.fc1.bias[HIDDEN_DEAD_ROWS] = torch.tensor(HIDDEN_DEAD_BIASES)
    original = export(model, example_input(2, 5), opset=opset)
    if required_op is not None:
        assert required_op in op_types(original)

    result = minimize(original)
    layers = match_linears(original, result.model, model.linears())

    # 3 rows of 5 weights and 3 biases in fc1, 3 columns of 3 in fc2, 3 elements per per-unit tensor.
    params_removed = 3 * 5 + 3 + 3 * 3 + 3 * per_unit_tensors
    assert_minimized(original, result, layers, {"fc1": [(5, 5)], "fc2": [(3, 5)]}, params_removed)

    weight1 = model.fc1.weight.detach().numpy()
    weight2 = model.fc2.weight.detach().numpy()
    np.testing.assert_array_equal(layers["fc1"][0][1].matrix, weight1[HIDDEN_KEPT_ROWS])
    np.testing.assert_array_equal(layers["fc2"][0][1].matrix, weight2[:, HIDDEN_KEPT_ROWS])

    # Each dead unit i carries the constant hidden(b1)[i], so fc2's bias absorbs W2[:, i] * hidden(b1)[i].
    with torch.no_grad():
        constants = model.hidden(model.fc1.bias[None, :]).double().numpy()[0, HIDDEN_DEAD_ROWS]
    expected_bias = model.fc2.bias.detach().double().numpy() + weight2[:, HIDDEN_DEAD_ROWS].astype(np.float64) @ constants
    bias_after = layers["fc2"][0][1].bias
    assert bias_after is not None
    np.testing.assert_allclose(bias_after.reshape(-1), expected_bias, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Unused units and cascades


def test_unused_hidden_units(export):
    model = seeded(MLP(nn.ReLU()))
    with torch.no_grad():
        model.fc2.weight[:, [0, 7]] = 0.0
    original = export(model, example_input(2, 5))
    result = minimize(original)
    layers = match_linears(original, result.model, model.linears())

    # fc1 loses rows 0 and 7 (2 * 5 weights + 2 biases), fc2 columns 0 and 7 (2 * 3).
    assert_minimized(original, result, layers, {"fc1": [(6, 5)], "fc2": [(3, 6)]}, 18)
    np.testing.assert_array_equal(layers["fc1"][0][1].matrix, model.fc1.weight.detach().numpy()[1:7])
    np.testing.assert_array_equal(layers["fc2"][0][1].matrix, model.fc2.weight.detach().numpy()[:, 1:7])
    np.testing.assert_array_equal(layers["fc2"][0][1].bias.reshape(-1), model.fc2.bias.detach().numpy())


# Both cascades remove one unit from each of l1, l2 and l3: l1 [7, 6], l2 [7, 7], l3 [5, 7],
# l4 [3, 5]. Removed: l1 6 + 1, l2 8 + 1 + 7, l3 8 + 1 + 5, l4 3, in total 40.
CASCADE_SHAPES = {"l1": [(7, 6)], "l2": [(7, 7)], "l3": [(5, 7)], "l4": [(3, 5)]}
CASCADE_PARAMS_REMOVED = 40


def test_forward_cascade_dead_units(export):
    model = seeded(DeepMLP())
    with torch.no_grad():
        # l1 unit 3 is the constant relu(0.5) = 0.5.
        model.l1.weight[3] = 0.0
        model.l1.bias[3] = 0.5
        # l2 unit 2 reads only l1 unit 3, so it is the constant relu(0.8 * 0.5 + 0.1) = 0.5.
        model.l2.weight[2] = 0.0
        model.l2.weight[2, 3] = 0.8
        model.l2.bias[2] = 0.1
        # l3 unit 4 reads only l2 unit 2, so it is the constant relu(-1.2 * 0.5 + 0.9) = 0.3.
        model.l3.weight[4] = 0.0
        model.l3.weight[4, 2] = -1.2
        model.l3.bias[4] = 0.9
    original = export(model, example_input(2, 6))
    result = minimize(original)
    layers = match_linears(original, result.model, model.linears())

    assert_minimized(original, result, layers, CASCADE_SHAPES, CASCADE_PARAMS_REMOVED)
    removed = {entry["node"]: entry for entry in result.report["layers"]}
    assert removed[layers["l1"][0][0].node]["removed_output_units"] == [3]
    assert removed[layers["l2"][0][0].node]["removed_output_units"] == [2]
    assert removed[layers["l3"][0][0].node]["removed_output_units"] == [4]
    assert removed[layers["l4"][0][0].node]["removed_input_units"] == [4]


def test_backward_cascade_unused_units(export):
    model = seeded(DeepMLP())
    with torch.no_grad():
        # No node reads l3 unit 1.
        model.l4.weight[:, 1] = 0.0
        # l2 unit 5 is read only by l3 row 1, so it becomes unused once that row goes.
        keep = model.l3.weight[1, 5].item()
        model.l3.weight[:, 5] = 0.0
        model.l3.weight[1, 5] = keep
        # l1 unit 0 is read only by l2 row 5, so it becomes unused once that row goes.
        keep = model.l2.weight[5, 0].item()
        model.l2.weight[:, 0] = 0.0
        model.l2.weight[5, 0] = keep
    original = export(model, example_input(2, 6))
    result = minimize(original)
    layers = match_linears(original, result.model, model.linears())

    assert_minimized(original, result, layers, CASCADE_SHAPES, CASCADE_PARAMS_REMOVED)
    removed = {entry["node"]: entry for entry in result.report["layers"]}
    assert removed[layers["l1"][0][0].node]["removed_output_units"] == [0]
    assert removed[layers["l2"][0][0].node]["removed_output_units"] == [5]
    assert removed[layers["l3"][0][0].node]["removed_output_units"] == [1]
    assert removed[layers["l4"][0][0].node]["removed_input_units"] == [1]


# ---------------------------------------------------------------------------------------------
# Concat of two Linear branches of different widths


@pytest.mark.parametrize("lin_bias", [0.0, 0.2], ids=["zero_bias", "constant_bias"])
def test_concat_branches_head_columns(export, lin_bias):
    model = seeded(ConcatBranches())
    with torch.no_grad():
        model.lin.weight[1] = 0.0
        model.lin.bias[1] = lin_bias
        model.mlp[0].weight[5] = 0.0
        model.mlp[0].bias[5] = 0.0
    original = export(model, example_input(2, 10))
    result = minimize(original)
    layers = match_linears(original, result.model, model.linears())

    # lin loses row 1 (10 + 1), mlp_in row 5 (10 + 1), mlp_out column 5 (1), head column 1 (1).
    expected_shapes = {"lin": [(2, 10)], "mlp_in": [(7, 10)], "mlp_out": [(1, 7)], "head": [(1, 3)]}
    assert_minimized(original, result, layers, expected_shapes, 24)

    # The head keeps original columns 0, 2 and 3, so the mlp column moves from 3 to 2.
    head_weight = model.head.weight.detach().numpy()
    head_after = layers["head"][0][1]
    np.testing.assert_array_equal(head_after.matrix, head_weight[:, [0, 2, 3]])
    head_entry = next(e for e in result.report["layers"] if e["node"] == head_after.node)
    assert head_entry["removed_input_units"] == [1]

    # The constant lin_bias of column 1 goes into the head bias.
    expected_bias = model.head.bias.detach().double().numpy() + lin_bias * head_weight[:, 1].astype(np.float64)
    np.testing.assert_allclose(head_after.bias.reshape(-1), expected_bias, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# A whole layer dead


def test_whole_layer_dead_keeps_batch(export):
    model = seeded(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)))
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3, 0.0, 0.0, 0.5, -1.0]))
    original = export(model, example_input(2, 6))
    result = minimize(original)
    minimized = result.model

    assert result.changed
    assert result.verification.passed, result.verification.message
    assert_same_outputs(original, minimized, batch_sizes=(1, 3, 7))
    assert_interface_unchanged(original, minimized)
    assert [d.dim_value for d in minimized.graph.output[0].type.tensor_type.shape.dim[1:]] == [3]
    onnx.checker.check_model(minimized, full_check=True)

    for tensor in minimized.graph.initializer:
        assert 0 not in tensor.dims, f"initializer '{tensor.name}' has zero-sized shape {list(tensor.dims)}"
    inferred = onnx.shape_inference.infer_shapes(minimized, strict_mode=True)
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        assert not any(d.HasField("dim_value") and d.dim_value == 0 for d in dims), (
            f"tensor '{value.name}' has a zero-sized dim: {value.type}"
        )

    # The output is the constant W3 relu(b2) + b3. The minimizer may keep one unit per hidden
    # layer or compute the constant another way (Expand of a bias). Either way each hidden
    # layer keeps at most one unit, and at most 15 parameters remain (6 + 1, 1 + 1 and 3 + 3
    # for three layers of one unit each).
    for op in weight_ops(minimized):
        assert min(op.matrix.shape) >= 1, f"node '{op.node}' has an empty weight {op.stored_shape}"
        assert op.matrix.shape[0] in (1, 3), f"node '{op.node}' keeps {op.matrix.shape[0]} output units"
    assert result.report["params_before"] == 6 * 8 + 8 + 8 * 8 + 8 + 8 * 3 + 3
    assert result.report["params_after"] <= 15
    assert count_parameters(minimized) == result.report["params_after"]

    again = onnx_squeeze.minimize(minimized, verify_outputs=False)
    assert not again.changed, f"a second run removed more: {again.report['layers']}"


# ---------------------------------------------------------------------------------------------
# Shared weights: one initializer read by two nodes that lose different units


@pytest.mark.parametrize("sharing", ["reuse", "tied"])
def test_shared_weight_copied_per_use(export, sharing):
    model = seeded(SharedMLP(sharing))
    fc_in_dead = [0, 1, 2, 3, 4]
    fc_in_biases = [0.3, -0.2, 0.5, 0.1, 0.0]  # ReLU constants 0.3, 0, 0.5, 0.1, 0
    with torch.no_grad():
        # First use: input units 0-4 are constants, so its columns 0-4 are folded away.
        model.fc_in.weight[fc_in_dead] = 0.0
        model.fc_in.bias[fc_in_dead] = torch.tensor(fc_in_biases)
        # Second use: no node reads output units 3-7, so its rows 3-7 go.
        model.fc_out.weight[:, 3:] = 0.0
    original = export(model, example_input(2, 6))

    shared_uses = [op for op in weight_ops(original) if op.matrix.shape == (8, 8)]
    assert len(shared_uses) == 2
    assert shared_uses[0].weight == shared_uses[1].weight, "the exporter did not share the weight initializer"

    result = minimize(original)
    linears = {"fc_in": model.fc_in, "shared": model.first, "fc_out": model.fc_out}
    layers = match_linears(original, result.model, linears)

    expected_shapes = {"fc_in": [(3, 6)], "shared": [(8, 3), (3, 8)], "fc_out": [(3, 3)]}
    # Before: fc_in 48 + 8, shared weight 64, biases 8 (reuse) or 16 (tied), fc_out 24 + 3.
    # After: fc_in 18 + 3, first 24 + 8, second 24 + 3, fc_out 9 + 3, so 92 in both cases.
    params_removed = (155 if sharing == "reuse" else 163) - 92
    assert_minimized(original, result, layers, expected_shapes, params_removed)

    weight = model.first.weight.detach().numpy()
    (_, first_after), (_, second_after) = layers["shared"]
    assert first_after.weight != second_after.weight
    np.testing.assert_array_equal(first_after.matrix, weight[:, 5:])
    np.testing.assert_array_equal(second_after.matrix, weight[:3, :])

    # The first use's bias absorbs the constants, and the second use's bias is only sliced.
    constants = np.zeros(8)
    constants[:5] = np.maximum(fc_in_biases, 0.0)
    first_bias = model.first.bias.detach().double().numpy()
    expected_first_bias = first_bias + weight.astype(np.float64) @ constants
    np.testing.assert_allclose(first_after.bias.reshape(-1), expected_first_bias, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(second_after.bias.reshape(-1), model.second.bias.detach().numpy()[:3])
