"""End-to-end minimization of the reference conv models in ``onnx_squeeze.train.models``.

Each test fills a model from a seeded source, places exact zeros on purpose (random weights
have no dead units), exports it with both torch exporters and minimizes it. It asserts that
verification passed, that the outputs match in onnxruntime within 1e-5, and that the
parameters removed reach a lower bound. The bound counts only the weights that the placed zeros
make removable for certain. Constants that meet zero padding may be kept, so they are
placed too, for exactness, but not counted.

Both exporters fold every BatchNorm into the Conv before it, so a zeroed filter followed by BN
arrives as a zero weight row with the BN shift as its bias.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")  # the dynamo exporter translates through onnxscript

from conv_helpers import EXPORTERS, assert_not_larger, export, minimize_and_check  # noqa: E402
from onnx_squeeze.train.models import MobileNetV2, ResNet, SENet, convnext_small_test  # noqa: E402
from onnx_squeeze.train.weights import (  # noqa: E402
    fill_seeded,
    set_batchnorm_channel,
    zero_input_units,
    zero_output_units,
)

pytestmark = [
    pytest.mark.torch,
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
    pytest.mark.filterwarnings("ignore:The feature will be removed"),
]

SEED = 0


def example(*shape: int) -> torch.Tensor:
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(SEED + 1))


def kill_filter(conv, bn, unit: int, shift: float) -> None:
    """Zero filter ``unit`` of ``conv`` and make the following BN output the constant ``shift``."""
    zero_output_units(conv, [unit], bias=None)
    set_batchnorm_channel(bn, unit, weight=1.0, bias=shift, mean=0.0, var=1.0 - bn.eps)


def place_resnet_zeros(model: ResNet) -> int:
    """Zero three conv1 filters in every basic block.

    Two get BN shift -0.5, which ReLU makes 0. The third gets shift 0.4, a constant into the
    padded conv2. Returns the weights that the first two free for certain: their conv1 rows
    and conv2 columns.
    """
    removable = 0
    for stage in model.stages:
        for block in stage:
            for unit in (1, 3):
                kill_filter(block.conv1, block.bn1, unit, -0.5)
                removable += block.conv1.weight[unit].numel() + block.conv2.weight[:, unit].numel()
            kill_filter(block.conv1, block.bn1, 5, 0.4)
    return removable


def place_se_zeros(model: SENet) -> int:
    """Zero two hidden units of every squeeze-excite gate and return the weights they free.

    One gets bias -0.3, which ReLU makes 0. The other gets bias 0.5, a constant that fc2, a
    1x1 conv on an [N, C, 1, 1] tensor, folds exactly.
    """
    removable = 0
    for stage in model.stages:
        for block in stage:
            se = block.se
            zero_output_units(se.fc1, [0], bias=-0.3)
            zero_output_units(se.fc1, [1], bias=0.5)
            removable += 2 * (se.fc1.weight[0].numel() + 1 + se.fc2.weight[:, 0].numel())
    return removable


def place_mobilenet_zeros(model: MobileNetV2) -> int:
    """Zero three expand filters in every block that has an expand conv.

    Two get BN shift -0.5, which ReLU6 makes 0. The depthwise conv then reads an all-zero
    channel and writes its own constant into the 1x1 projection. The third gets shift 0.4, a
    constant into the padded depthwise conv. Returns the expand rows, depthwise filters and
    projection columns of the first two.
    """
    removable = 0
    for block in model.blocks:
        layers = list(block.conv)
        if len(layers) < 8:  # no expand conv: depthwise, BN, ReLU6, project, BN
            continue
        expand, expand_bn, _, dw, _, _, project, _ = layers
        for unit in (0, 2):
            kill_filter(expand, expand_bn, unit, -0.5)
            removable += expand.weight[unit].numel() + dw.weight[unit].numel() + project.weight[:, unit].numel()
        kill_filter(expand, expand_bn, 4, 0.4)
    return removable


def place_convnext_zeros(model) -> int:
    """Place zeros in three ConvNeXt blocks and return the weights they free for certain.

    Stage 0: five MLP hidden units with zero pw1 rows and biases 0, 0.4, -1, 1.5, -0.2, whose
    GELU constants fold into pw2's bias. Stage 2: two hidden units with zero pw2 columns.
    Stage 1: a whole block with zero dw conv and pw2, so the block is the identity. Its
    hidden units all go, except one that a tool may keep so that no tensor becomes empty.

    The TorchScript exporter shares the two equal all-zero biases of that block (dw conv and
    pw2) through an Identity node, and a fold into pw2's bias may give it its own copy, so the
    bound leaves out one pw2 bias."""
    removable = 0
    block = model.stages[0][0]
    units, biases = [0, 5, 17, 30, 31], [0.0, 0.4, -1.0, 1.5, -0.2]
    zero_output_units(block.pwconv1, units, bias=biases)
    removable += len(units) * (block.pwconv1.in_features + 1 + block.pwconv2.out_features)

    block = model.stages[2][0]
    zero_input_units(block.pwconv2, [3, 100])
    removable += 2 * (block.pwconv1.in_features + 1 + block.pwconv2.out_features)

    block = model.stages[1][0]
    zero_output_units(block.dwconv, range(block.dwconv.out_channels))
    zero_output_units(block.pwconv2, range(block.pwconv2.out_features))
    hidden = block.pwconv1.out_features
    removable += (hidden - 1) * (block.pwconv1.in_features + 1 + block.pwconv2.out_features)
    removable -= block.pwconv2.bias.numel()
    return removable


MODELS = {
    "resnet": (lambda: ResNet(widths=(16, 32, 64), blocks_per_stage=(1, 1, 1)), place_resnet_zeros, (1, 28, 28)),
    "senet": (lambda: SENet(widths=(16, 32), blocks_per_stage=(1, 1)), None, (1, 28, 28)),
    "mobilenet_v2": (MobileNetV2, place_mobilenet_zeros, (1, 28, 28)),
    "convnext_small_test": (convnext_small_test, place_convnext_zeros, (3, 32, 32)),
}


def build(name: str):
    factory, place, input_shape = MODELS[name]
    model = fill_seeded(factory(), SEED)
    if name == "senet":
        removable = place_resnet_zeros(model) + place_se_zeros(model)
    else:
        removable = place(model)
    return model.eval(), removable, input_shape


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(MODELS))
def test_reference_model_minimized(tmp_path, name, exporter):
    model, removable, input_shape = build(name)
    assert removable > 0
    original = export(model, example(*input_shape), tmp_path, exporter)
    assert "BatchNormalization" not in [n.op_type for n in original.graph.node]

    result = minimize_and_check(original)

    removed = result.report["params_before"] - result.report["params_after"]
    assert removed >= removable, f"removed {removed} parameters, the placed zeros free at least {removable}"
    assert_not_larger(original, result)
