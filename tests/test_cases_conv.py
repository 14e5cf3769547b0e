"""Conv-network cases on which tools that shrink pruned networks have failed in public reports.

Each test builds a small torch model, fills it from a seeded source, zeros chosen filters (and
sets chosen biases), exports it with the TorchScript exporter and, where it adds coverage, the
dynamo exporter, minimizes it and checks three things. The first is the exact structure:
which original unit indices were removed from which weight, and the resulting shapes. The
second is the folded biases, computed here with numpy from the weights. The third is what
every result must satisfy (``conv_helpers.check_result`` and ``assert_not_larger``). Outputs
must match in onnxruntime at batch 1 and 3 within 1e-5 and pass the full checker. The
interface must keep its symbolic dims, the model must be no larger than its input, and a
second run must change nothing.

Facts about the exporters (torch 2.13, onnxscript 0.7) that the tests rely on. The tests
assert the first two on the exported models.

- Both exporters fold an inference-mode BatchNorm that follows a Conv into it, so the
  zeroed filter arrives as a zero weight row with a non-zero bias. Stand-alone BN is built
  by hand.
- The TorchScript exporter writes ``chunk`` with a dynamic batch as two Slices whose bounds
  are computed from ``Shape``, and ``split`` with explicit sizes as ``Split``.
- The dynamo exporter keeps opset 18 when asked for 17 on a graph with a ``ReduceMean``,
  and it writes an invalid opset-17 model for ``chunk`` (``Split`` with ``num_outputs``), so
  the Split cases run it at opset 18 only.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")  # the dynamo exporter translates through onnxscript

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import prune  # noqa: E402

import onnx_squeeze  # noqa: E402
from builders import GraphBuilder  # noqa: E402
from conv_helpers import (  # noqa: E402
    OPEN_END,
    WeightOp,
    assert_not_larger,
    constant,
    export,
    feeds_for,
    io_dims,
    minimize_and_check,
    op_by_shape,
    op_named,
    ops_by_shape,
    removed_units,
    run,
)
from onnx_squeeze.train.weights import fill_seeded, set_batchnorm_channel, zero_output_units  # noqa: E402
from onnx_squeeze.verify import DEFAULT_BATCH_SIZES  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
    pytest.mark.filterwarnings("ignore:The feature will be removed"),
]

SEED = 0
EXPORT_BATCH = 2  # the dynamo exporter specializes a batch of 1, so every export uses 2


def tuple_id(value):
    """Name a tuple parameter by its items in test ids, for example ``1,6`` in place of ``dead0``."""
    return ",".join(str(item) for item in value) if isinstance(value, tuple) else None


def example(*shape: int) -> torch.Tensor:
    return torch.randn(EXPORT_BATCH, *shape, generator=torch.Generator().manual_seed(SEED + 1))


def stored(op: WeightOp) -> np.ndarray:
    """Return the weight of ``op`` as ``[out, in, ...]``.

    Conv weights are stored that way, and so are Gemm weights, which both exporters write with
    transB=1. MatMul weights are stored ``[in, out]`` and come back transposed.
    """
    return op.weight.T if op.op_type == "MatMul" else op.weight


def assert_weight_shape(result, op: WeightOp, shape: tuple[int, ...]) -> WeightOp:
    """Find ``op``'s node in the minimized model, assert its stored weight shape and return it."""
    after = op_named(result.model, op.node)
    assert tuple(after.weight.shape) == tuple(shape), f"{op.node}: weight {after.weight.shape}, expected {shape}"
    return after


def assert_removed(result, op: WeightOp, *, out: list[int] | None = None, inp: list[int] | None = None) -> None:
    """Assert the original output and input unit indices that the report lists as removed from ``op``."""
    removed_out, removed_in = removed_units(result, op.node)
    if out is not None:
        assert removed_out == sorted(out), f"{op.node}: removed output units {removed_out}, expected {sorted(out)}"
    if inp is not None:
        assert removed_in == sorted(inp), f"{op.node}: removed input units {removed_in}, expected {sorted(inp)}"


def assert_bias(after: WeightOp, expected: np.ndarray) -> None:
    assert after.bias is not None, f"{after.node}: no bias after minimization"
    np.testing.assert_allclose(after.bias.reshape(-1), expected, rtol=1e-5, atol=1e-6, err_msg=f"bias of {after.node}")


def gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def leaky_relu(x: float, slope: float) -> float:
    return x if x > 0 else slope * x


def silu(x: float) -> float:
    return x / (1.0 + math.exp(-x))


def relu6(x: float) -> float:
    return min(max(x, 0.0), 6.0)


def batchnorm_constant(gamma, beta, mean, var, eps) -> np.float32:
    """Evaluate BN on an all-zero input channel in float32: ``(0 - mean) / sqrt(var + eps) * gamma + beta``."""
    f32 = np.float32
    return (f32(0.0) - f32(mean)) / np.sqrt(f32(var) + f32(eps)) * f32(gamma) + f32(beta)


def intermediate_shapes(model: onnx.ModelProto, names: list[str], feeds) -> list[tuple[int, ...]]:
    """Run ``model`` with ``names`` added as graph outputs and return their shapes."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    values = run(probe, feeds)
    return [tuple(v.shape) for v in values[len(model.graph.output):]]


# ---------------------------------------------------------------------------------------------
# A residual Add with a channel dead on one side only


class ResidualPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.stem(x))
        return self.head(y + self.branch(y))


def residual_pair(dead_both: int, dead_branch: int, branch_bias: float) -> ResidualPair:
    model = fill_seeded(ResidualPair(), SEED)
    zero_output_units(model.stem, [dead_both])
    zero_output_units(model.branch, [dead_both, dead_branch], bias=branch_bias)
    return model


@pytest.mark.parametrize(
    "exporter, dead_both, dead_branch, branch_bias",
    [
        ("torchscript", 2, 5, 0.0),
        ("torchscript", 2, 5, 0.3),
        ("torchscript", 0, 7, 0.0),
        ("torchscript", 7, 0, -0.4),
        ("dynamo", 2, 5, 0.0),
        ("dynamo", 2, 5, 0.3),
    ],
)
def test_residual_add_dead_one_side(tmp_path, exporter, dead_both, dead_branch, branch_bias):
    # With a branch bias b on the channel dead on both sides, the Add carries the constant b
    # into the 1x1 head, which folds it. The channel dead only in the branch stays live.
    model = residual_pair(dead_both, dead_branch, branch_bias)
    original = export(model, example(3, 16, 16), tmp_path, exporter)
    stem, branch, head = (op_by_shape(original, s) for s in [(8, 3, 3, 3), (8, 8, 3, 3), (4, 8, 1, 1)])

    result = minimize_and_check(original)

    assert_removed(result, stem, out=[dead_both])
    assert_removed(result, branch, out=[dead_both], inp=[dead_both])
    assert_removed(result, head, inp=[dead_both])
    assert_weight_shape(result, stem, (7, 3, 3, 3))
    assert_weight_shape(result, branch, (7, 7, 3, 3))
    head_after = assert_weight_shape(result, head, (4, 7, 1, 1))
    assert_bias(head_after, head.bias + branch_bias * stored(head)[:, dead_both, 0, 0])
    assert_not_larger(original, result)


# ---------------------------------------------------------------------------------------------
# A residual stream through a projection and three blocks


class ResidualStream(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(4, 8, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1)) for _ in range(3)
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        s = self.down(x)
        for block in self.blocks:
            s = s + block(s)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(s, 1), 1))


@pytest.mark.parametrize(
    "exporter, channel, case",
    [
        ("torchscript", 3, "A"),
        ("torchscript", 3, "A-bias"),
        ("torchscript", 3, "B"),
        ("torchscript", 0, "A"),
        ("torchscript", 7, "A-bias"),
        ("torchscript", 7, "B"),
        ("dynamo", 3, "A"),
        ("dynamo", 3, "A-bias"),
        ("dynamo", 3, "B"),
    ],
)
def test_residual_stream_needs_all_writers(tmp_path, exporter, channel, case):
    # Case A: every writer of the stream channel is zero, so it is removed everywhere. A-bias:
    # the projection writes the constant 0.2, which every reader (1x1 convs, pool + Linear)
    # folds. Case B: the third block writes a live value, so the channel stays everywhere.
    # In every case the bottleneck unit 1 of block 2 is dead (relu(-0.4) = 0) and is removed.
    model = fill_seeded(ResidualStream(), SEED)
    stream_bias = 0.2 if case == "A-bias" else 0.0
    zero_output_units(model.down, [channel], bias=stream_bias)
    for number, block in enumerate(model.blocks):
        if case != "B" or number < 2:
            zero_output_units(block[2], [channel])
    zero_output_units(model.blocks[1][0], [1], bias=-0.4)
    original = export(model, example(4, 8, 8), tmp_path, exporter)
    down = op_by_shape(original, (8, 4, 1, 1))
    firsts = ops_by_shape(original, (4, 8, 1, 1))
    lasts = ops_by_shape(original, (8, 4, 3, 3))
    head = op_by_shape(original, (3, 8))
    assert len(firsts) == len(lasts) == 3

    result = minimize_and_check(original)

    stream_removed = [] if case == "B" else [channel]
    width = 8 - len(stream_removed)
    assert_removed(result, down, out=stream_removed)
    assert_weight_shape(result, down, (width, 4, 1, 1))
    for number, (first, last) in enumerate(zip(firsts, lasts)):
        bottleneck_removed = [1] if number == 1 else []
        assert_removed(result, first, out=bottleneck_removed, inp=stream_removed)
        assert_removed(result, last, out=stream_removed, inp=bottleneck_removed)
        first_after = assert_weight_shape(result, first, (4 - len(bottleneck_removed), width, 1, 1))
        assert_weight_shape(result, last, (width, 4 - len(bottleneck_removed), 3, 3))
        kept_units = [unit for unit in range(4) if unit not in bottleneck_removed]
        assert_bias(first_after, first.bias[kept_units] + stream_bias * first.weight[kept_units, channel, 0, 0])
    assert_removed(result, head, inp=stream_removed)
    head_after = assert_weight_shape(result, head, (3, width))
    assert_bias(head_after, head.bias + stream_bias * head.weight[:, channel])
    assert_not_larger(original, result)


# ---------------------------------------------------------------------------------------------
# A tensor concatenated with itself


class SelfConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 6, 1)
        self.conv2 = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        return self.conv2(torch.cat([y, y], 1))


@pytest.mark.parametrize(
    "exporter, dead, bias",
    [
        ("torchscript", 3, 0.0),
        ("torchscript", 3, 0.6),
        ("torchscript", 0, 0.0),
        ("torchscript", 5, 0.6),
        ("dynamo", 3, 0.0),
        ("dynamo", 3, 0.6),
    ],
)
def test_concat_of_tensor_with_itself(tmp_path, exporter, dead, bias):
    model = fill_seeded(SelfConcat(), SEED)
    zero_output_units(model.conv1, [dead], bias=bias)
    original = export(model, example(4, 8, 8), tmp_path, exporter)
    conv1, conv2 = op_by_shape(original, (6, 4, 1, 1)), op_by_shape(original, (5, 12, 1, 1))

    result = minimize_and_check(original)

    assert_removed(result, conv1, out=[dead])
    assert_removed(result, conv2, inp=[dead, dead + 6])
    assert_weight_shape(result, conv1, (5, 4, 1, 1))
    conv2_after = assert_weight_shape(result, conv2, (5, 10, 1, 1))
    w2 = conv2.weight[:, :, 0, 0]
    assert_bias(conv2_after, conv2.bias + bias * (w2[:, dead] + w2[:, dead + 6]))
    concats = [n for n in result.model.graph.node if n.op_type == "Concat"]
    assert len(concats) == 1
    assert len(concats[0].input) == 2
    assert concats[0].input[0] == concats[0].input[1], "Concat no longer lists one tensor twice"
    assert_not_larger(original, result)


# ---------------------------------------------------------------------------------------------
# Depthwise group count, and a one-channel conv that is not depthwise


class DepthwiseSeparable(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw2 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.pw2(F.relu6(self.dw(F.relu6(self.pw1(x)))))


@pytest.mark.parametrize(
    "exporter, dead, dw_bias",
    [
        ("torchscript", (4, 11), (0.3, -0.2)),
        ("torchscript", (0, 15), (7.0, 0.0)),
        ("dynamo", (4, 11), (0.3, -0.2)),
        ("dynamo", (0, 15), (7.0, 0.0)),
    ],
    ids=tuple_id,
)
def test_depthwise_group_follows_channels(tmp_path, exporter, dead, dw_bias):
    # A dead pw1 channel gives the dw conv an all-zero input, so zero padding changes nothing
    # and the dw channel outputs relu6(dw bias) everywhere. pw2 is 1x1, so it folds that.
    model = fill_seeded(DepthwiseSeparable(), SEED)
    zero_output_units(model.pw1, dead)
    with torch.no_grad():
        model.dw.bias[list(dead)] = torch.tensor(dw_bias)
    original = export(model, example(8, 12, 12), tmp_path, exporter)
    pw1, dw, pw2 = (op_by_shape(original, s) for s in [(16, 8, 1, 1), (16, 1, 3, 3), (8, 16, 1, 1)])
    assert dw.group == 16

    result = minimize_and_check(original)

    assert_removed(result, pw1, out=list(dead))
    assert_removed(result, dw, out=list(dead))
    assert_removed(result, pw2, inp=list(dead))
    assert_weight_shape(result, pw1, (14, 8, 1, 1))
    dw_after = assert_weight_shape(result, dw, (14, 1, 3, 3))
    assert dw_after.group == 14
    pw2_after = assert_weight_shape(result, pw2, (8, 14, 1, 1))
    fold = sum(relu6(b) * pw2.weight[:, d, 0, 0] for d, b in zip(dead, dw_bias))
    assert_bias(pw2_after, pw2.bias + fold)
    assert_not_larger(original, result)


class OneChannelNeck(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 1, 3, padding=1)
        self.conv3 = nn.Conv2d(1, 4, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


@pytest.mark.parametrize("exporter, dead", [("torchscript", (2, 7)), ("torchscript", (0, 15)), ("dynamo", (2, 7))], ids=tuple_id)
def test_one_channel_conv_not_depthwise(tmp_path, exporter, dead):
    model = fill_seeded(OneChannelNeck(), SEED)
    zero_output_units(model.conv1, dead)
    original = export(model, example(3, 12, 12), tmp_path, exporter)
    conv1, conv2, conv3 = (op_by_shape(original, s) for s in [(16, 3, 3, 3), (1, 16, 3, 3), (4, 1, 1, 1)])

    result = minimize_and_check(original)

    assert_removed(result, conv1, out=list(dead))
    assert_removed(result, conv2, out=[], inp=list(dead))
    assert_removed(result, conv3, out=[], inp=[])
    assert_weight_shape(result, conv1, (14, 3, 3, 3))
    conv2_after = assert_weight_shape(result, conv2, (1, 14, 3, 3))
    assert conv2_after.group == 1
    conv3_after = assert_weight_shape(result, conv3, (4, 1, 1, 1))
    np.testing.assert_array_equal(conv3_after.weight, conv3.weight)
    assert_not_larger(original, result)


# ---------------------------------------------------------------------------------------------
# Flatten of conv channels into Linear columns, channel-major


class PoolFlattenLinear(nn.Module):
    def __init__(self, start_dim: bool = True):
        super().__init__()
        self.start_dim = start_dim
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = self.pool(F.relu(self.conv(x)))
        return self.fc(torch.flatten(h, 1) if self.start_dim else torch.flatten(h))


@pytest.mark.parametrize(
    "exporter, dead, bias, start_dim",
    [
        ("torchscript", 2, 0.0, True),
        ("torchscript", 2, 0.3, True),
        ("torchscript", 0, 0.3, True),
        ("torchscript", 3, 0.0, True),
        ("torchscript", 2, 0.0, False),
        ("torchscript", 2, 0.3, False),
        ("dynamo", 2, 0.0, True),
        ("dynamo", 2, 0.3, True),
        ("dynamo", 2, 0.3, False),
    ],
)
def test_flatten_maps_channel_blocks(tmp_path, exporter, dead, bias, start_dim):
    # Channel c of the pooled [N, 4, 2, 2] map is Linear columns 4c..4c+3. A constant channel
    # (bias 0.3 through ReLU and a padding-free average pool) folds through those columns.
    # torch.flatten(x) without start_dim flattens the batch too, so that variant has batch 1.
    model = fill_seeded(PoolFlattenLinear(start_dim), SEED)
    zero_output_units(model.conv, [dead], bias=bias)
    if start_dim:
        original = export(model, example(3, 8, 8), tmp_path, exporter)
        sizes = (1, 3)
    else:
        original = export(model, example(3, 8, 8)[:1], tmp_path, exporter, dynamic_batch=False)
        sizes = (1,)
    pools = [n for n in original.graph.node if n.op_type == "AveragePool"]
    assert len(pools) == 1
    pool_attributes = {a.name: list(a.ints) for a in pools[0].attribute if a.name in ("kernel_shape", "strides")}
    assert pool_attributes == {"kernel_shape": [4, 4], "strides": [4, 4]}
    conv = op_by_shape(original, (4, 3, 3, 3))
    fc_nodes = [node for node in original.graph.node if node.op_type in ("Gemm", "MatMul")]
    assert len(fc_nodes) == 1
    fc = op_named(original, fc_nodes[0].name)
    block = list(range(4 * dead, 4 * dead + 4))

    result = minimize_and_check(original, sizes=sizes)

    assert_removed(result, conv, out=[dead])
    assert_removed(result, fc, inp=block)
    assert_weight_shape(result, conv, (3, 3, 3, 3))
    fc_after = op_named(result.model, fc.node)
    assert stored(fc_after).shape == (5, 12), f"Linear weight [out, in] is {stored(fc_after).shape}, expected (5, 12)"
    kept_columns = [c for c in range(16) if c not in block]
    np.testing.assert_array_equal(stored(fc_after), stored(fc)[:, kept_columns])
    assert_bias(fc_after, fc.bias + bias * stored(fc)[:, block].sum(axis=1))
    if start_dim:
        for node in result.model.graph.node:
            if node.op_type == "Reshape":
                shape = constant(result.model, node.input[1])
                assert shape is None or shape[0] in (0, -1), f"Reshape {node.name} has a literal batch: {shape}"
    assert_not_larger(original, result)


# ---------------------------------------------------------------------------------------------
# A zero filter followed by BatchNorm with non-zero beta


class ConvBnPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv1x1 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(144, 2)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(torch.flatten(self.conv1x1(h), 1))


def conv_bn_pool_graph(model: ConvBnPool) -> onnx.ModelProto:
    """Build the same network as ONNX with a stand-alone BatchNormalization node."""
    def array(t):
        return t.detach().numpy().astype(np.float32)

    bn = model.bn
    b = GraphBuilder(input_shape=("N", 1, 12, 12))
    h = b.op("Conv", ["x", b.const(array(model.conv.weight), "conv_W")], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = b.op(
        "BatchNormalization",
        [h, b.const(array(bn.weight)), b.const(array(bn.bias)), b.const(array(bn.running_mean)), b.const(array(bn.running_var))],
        epsilon=bn.eps,
    )
    h = b.op("MaxPool", [b.op("Relu", [h])], kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("Conv", [h, b.const(array(model.conv1x1.weight), "c1x1_W"), b.const(array(model.conv1x1.bias))], kernel_shape=[1, 1])
    h = b.op("Flatten", [h], axis=1)
    y = b.op("Gemm", [h, b.const(array(model.fc.weight), "fc_W"), b.const(array(model.fc.bias))], transB=1)
    return b.model(y)


@pytest.mark.parametrize("form", ["torchscript", "dynamo", "standalone-bn"])
@pytest.mark.parametrize("filter_index, beta", [(5, 0.7), (5, -0.1), (0, 0.7)])
def test_zero_filter_then_batchnorm_shift(tmp_path, form, filter_index, beta):
    # The channel is relu(beta - mean * gamma / sqrt(var + eps)): 0.3323 with beta 0.7 and
    # exactly 0 with beta -0.1. MaxPool keeps a constant, and the 1x1 conv folds it.
    model = fill_seeded(ConvBnPool(), SEED)
    zero_output_units(model.conv, [filter_index])
    set_batchnorm_channel(model.bn, filter_index, weight=1.3, bias=beta, mean=0.2, var=0.5)
    channel = max(float(batchnorm_constant(1.3, beta, 0.2, 0.5, model.bn.eps)), 0.0)
    if beta == 0.7:
        assert channel == pytest.approx(0.3323, abs=1e-4)
    if form == "standalone-bn":
        original = conv_bn_pool_graph(model)
    else:
        original = export(model, example(1, 12, 12), tmp_path, form)
        assert "BatchNormalization" not in [n.op_type for n in original.graph.node], "the exporter did not fold BN"
    conv = op_by_shape(original, (8, 1, 3, 3))
    conv1x1 = op_by_shape(original, (4, 8, 1, 1))
    if form != "standalone-bn":
        assert not conv.weight[filter_index].any()
        assert conv.bias[filter_index] == pytest.approx(batchnorm_constant(1.3, beta, 0.2, 0.5, model.bn.eps), abs=1e-6)

    result = minimize_and_check(original)

    assert_removed(result, conv, out=[filter_index])
    assert_removed(result, conv1x1, inp=[filter_index])
    assert_weight_shape(result, conv, (7, 1, 3, 3))
    conv1x1_after = assert_weight_shape(result, conv1x1, (4, 7, 1, 1))
    if channel == 0.0:
        np.testing.assert_array_equal(conv1x1_after.bias, conv1x1.bias)
    else:
        assert_bias(conv1x1_after, conv1x1.bias + channel * conv1x1.weight[:, filter_index, 0, 0])
    if form == "standalone-bn":
        bn = [n for n in result.model.graph.node if n.op_type == "BatchNormalization"]
        assert len(bn) <= 1
        for node in bn:
            for name in node.input[1:]:
                assert constant(result.model, name).shape == (7,), f"BN parameter {name} was not sliced to 7 channels"
    assert_not_larger(original, result)


# ---------------------------------------------------------------------------------------------
# A constant channel with two consumers, one through Upsample and Concat


class TwoConsumers(nn.Module):
    def __init__(self, act: str):
        super().__init__()
        self.act = act
        self.a = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.c1 = nn.Conv2d(6, 4, 1)
        self.c2 = nn.Conv2d(3, 4, 1)
        self.c3 = nn.Conv2d(10, 4, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        a = self.a(x)
        a = F.leaky_relu(a, 0.1) if self.act == "leaky_relu" else F.silu(a)
        return self.c1(a), self.c3(torch.cat([self.up(a), self.c2(x)], 1))


@pytest.mark.parametrize(
    "exporter, act, channel",
    [
        ("torchscript", "leaky_relu", 2),
        ("torchscript", "silu", 2),
        ("torchscript", "leaky_relu", 5),
        ("dynamo", "leaky_relu", 2),
        ("dynamo", "silu", 5),
    ],
)
def test_constant_channel_two_consumers(tmp_path, exporter, act, channel):
    model = fill_seeded(TwoConsumers(act), SEED)
    zero_output_units(model.a, [channel], bias=-0.5)
    value = leaky_relu(-0.5, 0.1) if act == "leaky_relu" else silu(-0.5)
    assert value == pytest.approx(-0.05 if act == "leaky_relu" else -0.1888, abs=1e-4)
    original = export(model, example(3, 16, 16), tmp_path, exporter, output_names=("y1", "y2"))
    a, c1, c2, c3 = (op_by_shape(original, s) for s in [(6, 3, 3, 3), (4, 6, 1, 1), (4, 3, 1, 1), (4, 10, 1, 1)])
    assert "Resize" in [n.op_type for n in original.graph.node]

    result = minimize_and_check(original)

    assert_removed(result, a, out=[channel])
    assert_removed(result, c1, inp=[channel])
    assert_removed(result, c3, inp=[channel])
    assert_removed(result, c2, out=[], inp=[])
    assert_weight_shape(result, a, (5, 3, 3, 3))
    c1_after = assert_weight_shape(result, c1, (4, 5, 1, 1))
    c3_after = assert_weight_shape(result, c3, (4, 9, 1, 1))
    kept_columns = [c for c in range(10) if c != channel]
    np.testing.assert_array_equal(c3_after.weight, c3.weight[:, kept_columns])
    assert_bias(c1_after, c1.bias + np.float32(value) * c1.weight[:, channel, 0, 0])
    assert_bias(c3_after, c3.bias + np.float32(value) * c3.weight[:, channel, 0, 0])
    assert_not_larger(original, result)


# ---------------------------------------------------------------------------------------------
# A ConvNeXt block with channels-last MLP and GELU bias folding


class ConvNeXtCase(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8, eps=1e-6)
        self.pw1 = nn.Linear(8, 32)
        self.pw2 = nn.Linear(32, 8)
        self.gamma = nn.Parameter(torch.full((8,), 0.5))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.gamma * self.pw2(F.gelu(self.pw1(self.norm(h))))
        x = x + h.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize(
    "exporter, opset, rows, biases",
    [
        ("torchscript", 17, (5, 17, 30), (0.0, 0.4, -1.0)),
        ("torchscript", 20, (5, 17, 30), (0.0, 0.4, -1.0)),
        ("torchscript", 17, (0, 12, 31), (1.5, 0.0, -0.3)),
        ("dynamo", 17, (5, 17, 30), (0.0, 0.4, -1.0)),
        ("dynamo", 20, (5, 17, 30), (0.0, 0.4, -1.0)),
    ],
    ids=tuple_id,
)
def test_convnext_block_gelu_fold(tmp_path, exporter, opset, rows, biases):
    model = fill_seeded(ConvNeXtCase(), SEED)
    with torch.no_grad():
        model.gamma.fill_(0.5)
    zero_output_units(model.pw1, rows, bias=biases)
    assert gelu(0.4) == pytest.approx(0.2622, abs=1e-4)
    assert gelu(-1.0) == pytest.approx(-0.1587, abs=1e-4)
    original = export(model, example(3, 56, 56), tmp_path, exporter, opset=opset)
    op_types = [n.op_type for n in original.graph.node]
    assert ("Gelu" in op_types) == (opset >= 20)
    assert ("Erf" in op_types) == (opset < 20)
    pw1, pw2 = op_by_shape(original, (8, 32)), op_by_shape(original, (32, 8))
    assert pw1.op_type == pw2.op_type == "MatMul"
    transposes = [(n.input[0], list(n.attribute[0].ints)) for n in original.graph.node if n.op_type == "Transpose"]

    result = minimize_and_check(original)

    kept_units = [j for j in range(32) if j not in rows]
    assert_removed(result, pw1, out=list(rows))
    assert_removed(result, pw2, inp=list(rows))
    pw1_after = assert_weight_shape(result, pw1, (8, 29))
    pw2_after = assert_weight_shape(result, pw2, (29, 8))
    np.testing.assert_array_equal(pw1_after.weight, pw1.weight[:, kept_units])
    np.testing.assert_array_equal(pw2_after.weight, pw2.weight[kept_units, :])
    assert_bias(pw1_after, pw1.bias[kept_units])
    fold = sum(pw2.weight[j, :].astype(np.float64) * gelu(float(b)) for j, b in zip(rows, np.float32(biases)))
    assert_bias(pw2_after, pw2.bias + fold)
    assert [(n.input[0], list(n.attribute[0].ints)) for n in result.model.graph.node if n.op_type == "Transpose"] == transposes
    assert [n.op_type for n in result.model.graph.node].count("Add") == op_types.count("Add")
    assert_not_larger(original, result)


# ---------------------------------------------------------------------------------------------
# Split, Slice and Gather on the channel axis, and channel shuffle


class C2fSplit(nn.Module):
    """cv1 -> halves y0, y1 -> cv2(cat[y0, y1, conv3x3(y1)]); ``split_form`` picks chunk or split with sizes."""

    def __init__(self, split_form: str):
        super().__init__()
        self.split_form = split_form
        self.cv1 = nn.Conv2d(4, 8, 1)
        self.m = nn.Conv2d(4, 4, 3, padding=1)
        self.cv2 = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        y = self.cv1(x)
        y0, y1 = y.chunk(2, 1) if self.split_form == "chunk" else torch.split(y, [4, 4], 1)
        return self.cv2(torch.cat([y0, y1, self.m(y1)], 1))


@pytest.mark.parametrize(
    "exporter, opset, split_form, dead",
    [
        ("torchscript", 11, "chunk", (1, 6)),
        ("torchscript", 13, "chunk", (1, 6)),
        ("torchscript", 11, "split", (1, 6)),
        ("torchscript", 13, "split", (1, 6)),
        ("torchscript", 18, "split", (1, 6)),
        ("torchscript", 11, "split", (1, 2)),
        ("torchscript", 13, "split", (1, 2)),
        ("dynamo", 18, "chunk", (1, 6)),
        ("dynamo", 18, "chunk", (1, 2)),
        ("dynamo", 18, "split", (1, 6)),
    ],
    ids=tuple_id,
)
def test_split_sizes_follow_channels(tmp_path, exporter, opset, split_form, dead):
    # Dead (1, 6) is y0[1] and y1[2], one per half, so the halves become [3, 3]. Dead (1, 2)
    # is two units of y0, so the split becomes [2, 4].
    model = fill_seeded(C2fSplit(split_form), SEED)
    zero_output_units(model.cv1, dead)
    original = export(model, example(4, 8, 8), tmp_path, exporter, opset=opset)
    assert original.opset_import[0].version == opset
    op_types = [n.op_type for n in original.graph.node]
    if exporter == "torchscript" and split_form == "chunk":
        assert "Split" not in op_types
        assert op_types.count("Slice") == 2
        assert "Shape" in op_types
    else:
        assert op_types.count("Split") == 1
    cv1, m, cv2 = (op_by_shape(original, s) for s in [(8, 4, 1, 1), (4, 4, 3, 3), (6, 12, 1, 1)])
    in_y1 = [d - 4 for d in dead if d >= 4]
    halves = [4 - sum(d < 4 for d in dead), 4 - len(in_y1)]

    result = minimize_and_check(original)

    assert_removed(result, cv1, out=list(dead))
    assert_removed(result, m, out=[], inp=in_y1)
    assert_removed(result, cv2, inp=list(dead))
    assert_weight_shape(result, cv1, (6, 4, 1, 1))
    assert_weight_shape(result, m, (4, 4 - len(in_y1), 3, 3))
    assert_weight_shape(result, cv2, (6, 10, 1, 1))
    z_columns = op_named(result.model, cv2.node).weight[:, -4:]
    np.testing.assert_array_equal(z_columns, cv2.weight[:, 8:])

    concat = [n for n in result.model.graph.node if n.op_type == "Concat" and n.output[0] in _conv_inputs(result.model)]
    assert len(concat) == 1
    shapes = intermediate_shapes(result.model, list(concat[0].input), feeds_for(result.model, 1))
    assert [s[1] for s in shapes] == halves + [4]
    for node in result.model.graph.node:
        if node.op_type != "Split":
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if opset < 13:
            assert len(node.input) == 1, "opset 11 takes split sizes as an attribute"
            assert list(attributes.get("split", [])) == halves
        else:
            assert "split" not in attributes, "opset 13 and later take split sizes as an input"
            if len(node.input) > 1 and node.input[1]:
                assert constant(result.model, node.input[1]).tolist() == halves
            else:
                assert halves[0] == halves[1], "num_outputs splits evenly, so unequal halves need a split input"
    assert_not_larger(original, result)


def _conv_inputs(model: onnx.ModelProto) -> set[str]:
    return {n.input[0] for n in model.graph.node if n.op_type == "Conv"}


class ChannelSelect(nn.Module):
    """cv1 -> y; cv2(cat[y, select(y)]) where select is a Slice or a Gather on the channels."""

    WIDTH = {"slice": 4, "open_end": 6, "step": 4, "gather": 3}

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.cv1 = nn.Conv2d(4, 8, 1)
        self.cv2 = nn.Conv2d(8 + self.WIDTH[variant], 6, 1)

    def forward(self, x):
        y = self.cv1(x)
        if self.variant == "slice":
            s = y[:, 2:6]
        elif self.variant == "open_end":
            s = y[:, 2:]
        elif self.variant == "step":
            s = y[:, ::2]
        else:
            s = torch.index_select(y, 1, torch.tensor([0, 2, 5]))
        return self.cv2(torch.cat([y, s], 1))


def _select_node(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    nodes = [n for n in model.graph.node if n.op_type == op_type]
    assert len(nodes) == 1, f"expected one {op_type} node, found {len(nodes)}"
    return nodes[0]


# variant -> (dead cv1 units, cv2 columns that read them). Slices select y[2:6] = y2..y5 and
# y[2:] = y2..y7, and their columns start at 8. The Gather selects y0, y2, y5.
SELECT_CASES = {
    "slice": ((1, 4), [1, 4, 8 + 2]),
    "open_end": ((1, 4), [1, 4, 8 + 2]),
    "gather": ((1, 2), [1, 2, 8 + 1]),
}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("variant", ["slice", "open_end", "gather"])
def test_slice_and_gather_remapped(tmp_path, exporter, variant):
    dead, columns = SELECT_CASES[variant]
    model = fill_seeded(ChannelSelect(variant), SEED)
    zero_output_units(model.cv1, dead)
    original = export(model, example(4, 8, 8), tmp_path, exporter)
    cv1 = op_by_shape(original, (8, 4, 1, 1))
    cv2 = op_by_shape(original, (6, 8 + ChannelSelect.WIDTH[variant], 1, 1))
    if variant != "gather":
        ends = constant(original, _select_node(original, "Slice").input[2])
        assert (int(ends[0]) >= OPEN_END) == (variant == "open_end")

    result = minimize_and_check(original)

    assert_removed(result, cv1, out=list(dead))
    assert_removed(result, cv2, inp=columns)
    assert_weight_shape(result, cv2, (6, 8 + ChannelSelect.WIDTH[variant] - len(columns), 1, 1))
    if variant == "gather":
        indices = constant(result.model, _select_node(result.model, "Gather").input[1])
        assert indices.tolist() == [0, 3], "Gather indices [0, 2, 5] without y1 and y2 are [0, 3]"
    else:
        node = _select_node(result.model, "Slice")
        starts, ends = (constant(result.model, node.input[slot]) for slot in (1, 2))
        assert starts.tolist() == [1], "y2 is y1 after removing y1"
        if variant == "slice":
            assert ends.tolist() == [4], "y[2:6] without y1 and y4 is the new range [1:4]"
        else:
            assert int(ends[0]) >= OPEN_END, f"the open end became {ends.tolist()}"
    assert_not_larger(original, result)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_step_slice_stays_exact(tmp_path, exporter):
    # y[:, ::2] selects y0, y2, y4, y6. Removing y1 breaks the step pattern, so a tool must
    # either rewrite the Slice (for example into a Gather) or keep y1. Only dead units may go.
    model = fill_seeded(ChannelSelect("step"), SEED)
    zero_output_units(model.cv1, [1, 4])
    original = export(model, example(4, 8, 8), tmp_path, exporter)
    cv1, cv2 = op_by_shape(original, (8, 4, 1, 1)), op_by_shape(original, (6, 12, 1, 1))

    result = minimize_and_check(original)

    removed_cv1, _ = removed_units(result, cv1.node)
    _, removed_cv2 = removed_units(result, cv2.node)
    assert set(removed_cv1) <= {1, 4}
    columns_of_unit = {1: [1], 4: [4, 10]}  # y4 is also s2, column 8 + 2
    assert removed_cv2 == sorted(c for unit in removed_cv1 for c in columns_of_unit[unit])
    assert_not_larger(original, result)


class ChannelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.cv1 = nn.Conv2d(4, 8, 1)
        self.cv2 = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        y = self.cv1(x)
        b, c, h, w = y.shape
        return self.cv2(y.reshape(b, 2, 4, h, w).transpose(1, 2).reshape(b, 8, h, w))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("dead", [(1,), (1, 5)], ids=tuple_id)
def test_channel_shuffle_uniform_only(tmp_path, exporter, dead):
    # The shuffle moves y[g * 4 + i] to position 2 * i + g. Removing y1 alone leaves groups of
    # 3 and 4 channels, which no Reshape to [B, 2, k, H, W] can hold, so nothing may go.
    # Removing y1 and y5 (i = 1 in both groups) is uniform. It is allowed but not required,
    # and it then removes cv2 columns 2 and 3.
    model = fill_seeded(ChannelShuffle(), SEED)
    zero_output_units(model.cv1, dead)
    original = export(model, example(4, 8, 8), tmp_path, exporter)
    cv1, cv2 = op_by_shape(original, (8, 4, 1, 1)), op_by_shape(original, (6, 8, 1, 1))

    result = minimize_and_check(original)

    removed = (removed_units(result, cv1.node)[0], removed_units(result, cv2.node)[1])
    if len(dead) == 1:
        assert removed == ([], []), f"a non-uniform removal through the shuffle: {removed}"
    else:
        assert removed in (([], []), ([1, 5], [2, 3])), f"removal through the shuffle is not the uniform one: {removed}"
    assert_not_larger(original, result)


# ---------------------------------------------------------------------------------------------
# A Reshape into a graph output keeps the head's channels


class DetectionHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 18, 1)

    def forward(self, x):
        y = self.head(F.relu(self.body(x)))
        b, _, h, w = y.shape
        return y.view(b, 3, 6, h, w).permute(0, 1, 3, 4, 2)


@pytest.mark.parametrize(
    "exporter, body_dead, head_bias",
    [("torchscript", 5, 0.0), ("torchscript", 0, 0.7), ("dynamo", 5, 0.0), ("dynamo", 5, 0.7)],
)
def test_reshape_into_output_keeps_head(tmp_path, exporter, body_dead, head_bias):
    model = fill_seeded(DetectionHead(), SEED)
    zero_output_units(model.head, [4], bias=head_bias)
    zero_output_units(model.body, [body_dead])
    original = export(model, example(3, 8, 8), tmp_path, exporter)
    body, head = op_by_shape(original, (8, 3, 3, 3)), op_by_shape(original, (18, 8, 1, 1))
    assert io_dims(original)[-1] == ("y", ["batch", 3, 8, 8, 6])

    result = minimize_and_check(original)

    assert_removed(result, body, out=[body_dead])
    assert_removed(result, head, out=[], inp=[body_dead])
    assert_weight_shape(result, body, (7, 3, 3, 3))
    assert_weight_shape(result, head, (18, 7, 1, 1))
    for batch in (1, 3):
        (y,) = run(result.model, feeds_for(result.model, batch))
        assert y.shape == (batch, 3, 8, 8, 6)
        np.testing.assert_array_equal(y[:, 0, :, :, 4], np.float32(head_bias))
    assert_not_larger(original, result)


# ---------------------------------------------------------------------------------------------
# The batch dimension stays dynamic


class StridedFlatten(nn.Module):
    def __init__(self, fully_convolutional: bool = False):
        super().__init__()
        self.fully_convolutional = fully_convolutional
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Conv2d(8, 10, 1) if fully_convolutional else nn.Linear(128, 10)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(h) if self.fully_convolutional else self.fc(torch.flatten(h, 1))


def _assert_no_literal_shapes(original: onnx.ModelProto, minimized: onnx.ModelProto) -> None:
    """Assert that no node the tool added fixes the batch size.

    A new Reshape target must start with 0 or -1, and a new Expand or ConstantOfShape must take
    its shape from the graph, not from a constant.
    """
    existing = {n.name for n in original.graph.node}
    for node in minimized.graph.node:
        if node.name in existing:
            continue
        if node.op_type == "Reshape":
            shape = constant(minimized, node.input[1])
            assert shape is None or shape[0] in (0, -1), f"new Reshape {node.name} has a literal batch: {shape}"
        if node.op_type in ("Expand", "ConstantOfShape"):
            slot = 1 if node.op_type == "Expand" else 0
            assert constant(minimized, node.input[slot]) is None, f"new {node.op_type} {node.name} has a constant shape"


@pytest.mark.parametrize(
    "exporter, dead, bias", [("torchscript", (1, 4), 0.0), ("torchscript", (0, 7), -0.3), ("dynamo", (1, 4), 0.0)],
    ids=tuple_id,
)
def test_batch_dim_stays_dynamic(tmp_path, exporter, dead, bias):
    assert EXPORT_BATCH not in DEFAULT_BATCH_SIZES, "the tool's own check must use another batch than the export"
    model = fill_seeded(StridedFlatten(), SEED)
    zero_output_units(model.conv2, dead, bias=bias)
    original = export(model, example(3, 8, 8), tmp_path, exporter)
    assert io_dims(original) == [("x", ["batch", 3, 8, 8]), ("y", ["batch", 10])]
    conv2, fc = op_by_shape(original, (8, 8, 3, 3)), op_by_shape(original, (10, 128))
    columns = [16 * d + k for d in dead for k in range(16)]

    result = minimize_and_check(original, sizes=(1, 2, 5))

    assert_removed(result, conv2, out=list(dead))
    assert_removed(result, fc, inp=columns)
    assert_weight_shape(result, conv2, (6, 8, 3, 3))
    fc_after = assert_weight_shape(result, fc, (10, 96))
    np.testing.assert_array_equal(fc_after.bias, fc.bias)
    _assert_no_literal_shapes(original, result.model)
    assert_not_larger(original, result)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_dynamic_spatial_dims_kept(tmp_path, exporter):
    model = fill_seeded(StridedFlatten(fully_convolutional=True), SEED)
    zero_output_units(model.conv2, (1, 4))
    if exporter == "dynamo":
        batch, height, width = (torch.export.Dim(name, min=2) for name in ("batch", "height", "width"))
        options = {"dynamic_batch": False, "dynamic_shapes": ({0: batch, 2: height, 3: width},)}
    else:
        axes = {0: "batch", 2: "height", 3: "width"}
        options = {"dynamic_batch": False, "dynamic_axes": {"x": axes, "y": {0: "batch", 2: "out_height", 3: "out_width"}}}
    original = export(model, example(3, 8, 8), tmp_path, exporter, **options)
    input_dims = io_dims(original)[0][1]
    assert all(isinstance(d, str) and d for d in (input_dims[0], input_dims[2], input_dims[3])), input_dims
    conv2, conv3 = op_by_shape(original, (8, 8, 3, 3)), op_by_shape(original, (10, 8, 1, 1))

    result = minimize_and_check(original)

    assert_removed(result, conv2, out=[1, 4])
    assert_removed(result, conv3, inp=[1, 4])
    assert_weight_shape(result, conv2, (6, 8, 3, 3))
    assert_weight_shape(result, conv3, (10, 6, 1, 1))
    for batch in (1, 2, 5):
        for height, width in ((8, 8), (12, 10)):
            sizes = dict(zip((input_dims[0], input_dims[2], input_dims[3]), (batch, height, width)))
            feeds = feeds_for(original, sizes)
            (want,), (got,) = run(original, feeds), run(result.model, feeds)
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    _assert_no_literal_shapes(original, result.model)
    assert_not_larger(original, result)


# ---------------------------------------------------------------------------------------------
# Stale value_info and initializer-input shapes


def _model_for_shape_info(model_kind: str):
    if model_kind == "residual":
        return residual_pair(2, 5, 0.0), example(3, 16, 16), (8, 3, 3, 3), (7, 3, 3, 3)
    model = fill_seeded(PoolFlattenLinear(), SEED)
    zero_output_units(model.conv, [2])
    return model, example(3, 8, 8), (4, 3, 3, 3), (3, 3, 3, 3)


@pytest.mark.parametrize("model_kind", ["residual", "flatten"])
@pytest.mark.parametrize(
    "exporter, form",
    [("torchscript", "value_info"), ("dynamo", "value_info"), ("torchscript", "initializers_as_inputs")],
)
def test_shape_info_follows_slicing(tmp_path, model_kind, exporter, form):
    model, x, conv_shape, conv_shape_after = _model_for_shape_info(model_kind)
    if form == "value_info":
        original = onnx.shape_inference.infer_shapes(export(model, x, tmp_path, exporter), strict_mode=True)
        assert len(original.graph.value_info) > 0
    else:
        original = export(model, x, tmp_path, exporter, keep_initializers_as_inputs=True)
        initializers = {t.name for t in original.graph.initializer}
        assert len([v for v in original.graph.input if v.name in initializers]) > 0
    conv = ops_by_shape(original, conv_shape)[0]

    result = minimize_and_check(original)

    assert_weight_shape(result, conv, conv_shape_after)
    minimized = result.model
    onnx.shape_inference.infer_shapes(minimized, strict_mode=True)
    fresh = onnx.ModelProto()
    fresh.CopyFrom(minimized)
    del fresh.graph.value_info[:]
    fresh = onnx.shape_inference.infer_shapes(fresh)
    inferred = {v.name: v.type for v in fresh.graph.value_info}
    for value in minimized.graph.value_info:
        assert value.name in inferred, f"value_info {value.name} names a tensor that shape inference does not reach"
        assert value.type == inferred[value.name], f"stale value_info for {value.name}"
    dims = {t.name: list(t.dims) for t in minimized.graph.initializer}
    for value in minimized.graph.input:
        if value.name in dims:
            declared = [d.dim_value for d in value.type.tensor_type.shape.dim]
            assert declared == dims[value.name], f"graph input {value.name} declares {declared}, initializer is {dims[value.name]}"
    assert_not_larger(original, result)


# ---------------------------------------------------------------------------------------------
# BatchNorm with running_var = 0 on a pruned channel


class ConvBn1x1(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, eps=1e-5)
        self.conv1x1 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv1x1(F.relu(self.bn(self.conv(x))))


def conv_bn_1x1_graph(model: ConvBn1x1, eps: float) -> onnx.ModelProto:
    """Build the same network as ONNX with a stand-alone BatchNormalization node of epsilon ``eps``."""
    def array(t):
        return t.detach().numpy().astype(np.float32)

    bn = model.bn
    b = GraphBuilder(input_shape=("N", 3, 8, 8))
    h = b.op("Conv", ["x", b.const(array(model.conv.weight), "conv_W")], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = b.op(
        "BatchNormalization",
        [h, b.const(array(bn.weight)), b.const(array(bn.bias)), b.const(array(bn.running_mean)), b.const(array(bn.running_var))],
        epsilon=eps,
    )
    y = b.op("Conv", [b.op("Relu", [h]), b.const(array(model.conv1x1.weight), "c1x1_W"), b.const(array(model.conv1x1.bias))], kernel_shape=[1, 1])
    return b.model(y)


def _conv_bn_zero_variance(mean: float) -> ConvBn1x1:
    model = fill_seeded(ConvBn1x1(), SEED)
    zero_output_units(model.conv, [2])
    set_batchnorm_channel(model.bn, 2, weight=1.0, bias=0.25, mean=mean, var=0.0)
    return model


@pytest.mark.parametrize("form", ["torchscript", "dynamo", "standalone-bn"])
@pytest.mark.parametrize("mean", [1e-3, -1e-3])
def test_batchnorm_zero_variance_fold(tmp_path, form, mean):
    # Channel 2 is relu(0.25 - mean / sqrt(1e-5)): 0 for mean 1e-3 (no fold), 0.566 for -1e-3.
    model = _conv_bn_zero_variance(mean)
    channel = max(float(batchnorm_constant(1.0, 0.25, mean, 0.0, 1e-5)), 0.0)
    assert channel == (0.0 if mean > 0 else pytest.approx(0.5662, abs=1e-4))
    if form == "standalone-bn":
        original = conv_bn_1x1_graph(model, eps=1e-5)
    else:
        original = export(model, example(3, 8, 8), tmp_path, form)
    conv, conv1x1 = op_by_shape(original, (4, 3, 3, 3)), op_by_shape(original, (2, 4, 1, 1))
    if form != "standalone-bn":
        channel = max(float(conv.bias[2]), 0.0)  # the exporter's own fold of BN into the conv bias

    result = minimize_and_check(original, atol=1e-5, rtol=1e-4)

    assert_removed(result, conv, out=[2])
    assert_removed(result, conv1x1, inp=[2])
    conv1x1_after = assert_weight_shape(result, conv1x1, (2, 3, 1, 1))
    if channel == 0.0:
        np.testing.assert_array_equal(conv1x1_after.bias, conv1x1.bias)
    else:
        assert_bias(conv1x1_after, conv1x1.bias + np.float32(channel) * conv1x1.weight[:, 2, 0, 0])
    for batch in (1, 3):
        (y,) = run(result.model, feeds_for(result.model, batch))
        assert np.isfinite(y).all()
    assert_not_larger(original, result)


@pytest.mark.parametrize("mean", [-1e-3, 0.0])
def test_nonfinite_batchnorm_channel_kept(mean):
    # With eps = 0 and running_var = 0 the original computes 0 / 0 or x / 0 on channel 2, so
    # it outputs NaN or Inf. The tool must leave that channel as it is, not fold it.
    model = _conv_bn_zero_variance(mean)
    original = conv_bn_1x1_graph(model, eps=0.0)
    feeds = feeds_for(original, 3)
    (want,) = run(original, feeds)
    assert not np.isfinite(want).all(), "the eps = 0 model should output NaN or Inf"
    conv, conv1x1 = op_by_shape(original, (4, 3, 3, 3)), op_by_shape(original, (2, 4, 1, 1))

    result = onnx_squeeze.minimize(original)

    assert not result.verification.passed, "an original with NaN or Inf outputs is a reported special case, not a pass"
    assert_removed(result, conv, out=[])
    assert_removed(result, conv1x1, inp=[])
    assert_weight_shape(result, conv, (4, 3, 3, 3))
    assert_weight_shape(result, conv1x1, (2, 4, 1, 1))
    bn = [n for n in result.model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bn) == 1
    assert [constant(result.model, name).shape for name in bn[0].input[1:]] == [(4,)] * 4
    onnx.checker.check_model(result.model, full_check=True)
    (got,) = run(result.model, feeds)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, equal_nan=True)
    assert io_dims(result.model) == io_dims(original)
    assert_not_larger(original, result)


# ---------------------------------------------------------------------------------------------
# Pruning masks still in the model; unstructured zeros alone


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(256, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(F.relu(self.fc2(x)))


def _pruned_lenet(structured: bool) -> LeNet5:
    model = fill_seeded(LeNet5(), SEED)
    if structured:
        prune.ln_structured(model.conv2, "weight", amount=0.5, n=2, dim=0)
    prune.l1_unstructured(model.fc1, "weight", amount=0.8)
    return model


def _export_pruned(model, tmp_path, exporter: str, form: str) -> onnx.ModelProto:
    """Export three ways: (a) after prune.remove, (b) masks kept without constant folding, (c) masks kept with folding."""
    if form == "a":
        for module in (model.conv2, model.fc1):
            if prune.is_pruned(module):
                prune.remove(module, "weight")
        return export(model, example(1, 28, 28), tmp_path, exporter)
    if form == "b":
        option = {"do_constant_folding": False} if exporter == "torchscript" else {"optimize": False}
        return export(model, example(1, 28, 28), tmp_path, exporter, **option)
    return export(model, example(1, 28, 28), tmp_path, exporter)


def _has_mask_mul(model: onnx.ModelProto) -> bool:
    """Return whether a Mul computes from initializers alone, as ``weight_orig * weight_mask`` does.

    The TorchScript exporter casts the mask first, so the Mul may read a Cast of an initializer.
    """
    computed = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if all(name in computed for name in node.input if name):
            if node.op_type == "Mul" and node.input:
                return True
            computed.update(node.output)
    return False


@pytest.mark.parametrize(
    "exporter, form", [("torchscript", "a"), ("torchscript", "b"), ("torchscript", "c"), ("dynamo", "a"), ("dynamo", "b")],
)
def test_pruned_filters_fold_into_fc1(tmp_path, exporter, form):
    model = _pruned_lenet(structured=True)
    conv2_weight = model.conv2.weight.detach().numpy()
    dead = [c for c in range(16) if not conv2_weight[c].any()]
    assert len(dead) == 8
    conv2_bias = model.conv2.bias.detach().numpy()
    fc1_weight = model.fc1.weight.detach().numpy()  # [120, 256]
    fc1_bias = model.fc1.bias.detach().numpy()
    original = _export_pruned(model, tmp_path, exporter, form)
    assert _has_mask_mul(original) == (form == "b"), "form (b) keeps weight_orig * weight_mask, the others do not"
    conv2 = op_by_shape(original, (16, 6, 5, 5)) if form != "b" else None
    fc1 = op_by_shape(original, (120, 256)) if form != "b" else None

    result = minimize_and_check(original)

    assert not _has_mask_mul(result.model), "the Mul of two initializers was not folded"
    columns = [16 * c + k for c in dead for k in range(16)]
    kept_columns = [c for c in range(256) if c not in columns]
    assert len(ops_by_shape(result.model, (8, 6, 5, 5))) == 1, "conv2 does not have 8 output channels"
    fc1_after = ops_by_shape(result.model, (120, 128))
    assert len(fc1_after) == 1, "fc1 does not have 128 input columns"
    np.testing.assert_array_equal(fc1_after[0].weight, fc1_weight[:, kept_columns])
    fold = sum(max(float(conv2_bias[c]), 0.0) * fc1_weight[:, 16 * c:16 * c + 16].sum(axis=1) for c in dead)
    assert_bias(fc1_after[0], fc1_bias + fold)
    if conv2 is not None:
        assert_removed(result, conv2, out=dead)
        assert_removed(result, fc1, inp=columns, out=[])
    # Scattered zeros in fc1 remove no row: every row still has a non-zero in a kept column.
    assert (fc1_weight[:, kept_columns] != 0).any(axis=1).all()
    assert ops_by_shape(result.model, (84, 120)), "fc2 lost inputs although no fc1 row is all zero"
    assert result.report["bytes_after"] < result.report["bytes_before"]
    assert_not_larger(original, result)


@pytest.mark.parametrize("exporter, form", [("torchscript", "a"), ("torchscript", "c"), ("dynamo", "a")])
def test_scattered_zeros_not_larger(tmp_path, exporter, form):
    model = _pruned_lenet(structured=False)
    original = _export_pruned(model, tmp_path, exporter, form)

    result = onnx_squeeze.minimize(original)

    assert result.verification.passed, result.verification.message
    assert not result.changed, f"scattered zeros removed units: {result.report['layers']}"
    assert result.report["bytes_after"] <= result.report["bytes_before"]
    assert_not_larger(original, result)


# ---------------------------------------------------------------------------------------------
# Zero padding and constant channels


class ConstantIntoPadded(nn.Module):
    """conv1 -> ReLU -> a consumer that pads with zeros: a k x k conv or a padded average pool."""

    def __init__(self, consumer: str):
        super().__init__()
        self.consumer = consumer
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        if consumer == "conv3x3":
            self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        elif consumer == "conv5x5":
            self.conv2 = nn.Conv2d(6, 4, 5, padding=2)
        elif consumer == "conv3x3-stride2":
            self.conv2 = nn.Conv2d(6, 4, 3, stride=2, padding=1)
        else:
            self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True)
            self.conv2 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        if self.consumer == "avgpool":
            h = self.pool(h)
        return self.conv2(h)


@pytest.mark.parametrize(
    "exporter, consumer, dead",
    [
        ("torchscript", "conv3x3", 2),
        ("torchscript", "conv3x3", 0),
        ("torchscript", "conv5x5", 2),
        ("torchscript", "conv3x3-stride2", 5),
        ("torchscript", "avgpool", 2),
        ("dynamo", "conv3x3", 2),
        ("dynamo", "avgpool", 2),
    ],
)
def test_constant_channel_into_zero_padding(tmp_path, exporter, consumer, dead):
    # The channel is relu(0.5) = 0.5 everywhere, but the consumer reads zeros in its padding,
    # so folding 0.5 into a plain bias is wrong on the border. The channel must be kept, or
    # folded with a per-position bias. Either way the border pixels must match.
    model = fill_seeded(ConstantIntoPadded(consumer), SEED)
    zero_output_units(model.conv1, [dead], bias=0.5)
    original = export(model, example(3, 8, 8), tmp_path, exporter)
    conv1 = op_by_shape(original, (6, 3, 3, 3))

    result = minimize_and_check(original)

    removed, _ = removed_units(result, conv1.node)
    assert removed in ([], [dead])
    for batch in (1, 3):
        feeds = feeds_for(original, batch)
        (want,), (got,) = run(original, feeds), run(result.model, feeds)
        for name, border in [("top", np.s_[..., 0, :]), ("bottom", np.s_[..., -1, :]),
                             ("left", np.s_[..., :, 0]), ("right", np.s_[..., :, -1])]:
            np.testing.assert_allclose(got[border], want[border], atol=1e-5, rtol=1e-5, err_msg=f"{name} border")
    assert_not_larger(original, result)


@pytest.mark.parametrize(
    "exporter, consumer, dead",
    [("torchscript", "conv3x3", 2), ("torchscript", "conv5x5", 5), ("torchscript", "avgpool", 0), ("dynamo", "conv3x3", 2)],
)
def test_zero_channel_into_zero_padding_removed(tmp_path, exporter, consumer, dead):
    # A zero filter with zero bias is 0 everywhere, which matches the zero padding, so it goes.
    model = fill_seeded(ConstantIntoPadded(consumer), SEED)
    zero_output_units(model.conv1, [dead])
    original = export(model, example(3, 8, 8), tmp_path, exporter)
    conv1 = op_by_shape(original, (6, 3, 3, 3))
    conv2 = op_by_shape(original, (4, 6) + tuple(model.conv2.kernel_size))

    result = minimize_and_check(original)

    assert_removed(result, conv1, out=[dead])
    assert_removed(result, conv2, inp=[dead])
    assert_weight_shape(result, conv1, (5, 3, 3, 3))
    conv2_after = assert_weight_shape(result, conv2, (4, 5) + tuple(model.conv2.kernel_size))
    np.testing.assert_array_equal(conv2_after.bias, conv2.bias)
    assert_not_larger(original, result)
