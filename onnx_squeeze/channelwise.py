"""The table of channel-wise ops: ops that treat each channel on its own.

Each op here maps channel c of its input to channel c of its output (the axis may move, as
in Transpose or a Reduce without ``keepdims``), so the two are coupled units. For every op
the table gives:

- ``check``: why the node cannot be handled (returns a reason) or None;
- ``out_axis``: where the input's channel axis lands in the output, or None when the op
  touches that axis (a pool over channels, a Transpose that is not a permutation of it);
- ``constant``: how a spatially constant channel maps through the op, as (known, value)
  arrays. An op that can turn a constant into something that varies over positions (zero
  padding, pooling that counts padding) keeps only the constants that stay exact;
- ``params``: input slots holding one value per channel (BatchNormalization's scale, bias,
  mean and variance; a depthwise conv's weight and bias), sliced on axis 0 with the channels.

The algebra: BatchNormalization in inference form is ``scale * (x - mean) / sqrt(var + eps)
+ B``, an affine map per channel; a depthwise conv multiplies channel c by its own kernel,
so a channel that is constant ``v`` stays constant ``v * sum(W[c]) + b[c]`` when nothing is
padded, and becomes ``b[c]`` when its kernel is zero or ``v`` is 0; max and average pooling
and Resize keep a constant channel constant; InstanceNormalization maps any constant
channel to its ``B`` in exact arithmetic, but only a zero channel in float32. A channel whose
BatchNormalization or InstanceNormalization scale is 0 is its ``B`` whatever the input. Expand broadcasts other axes; a target shape that names the channel
count is rewritten with the new count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from .graph import GraphIndex, attribute
from .layers import conv_has_padding, is_depthwise

ConstantFn = Callable[[np.ndarray, np.ndarray, onnx.NodeProto, GraphIndex], tuple[np.ndarray, np.ndarray]]

BATCH_NORM_DEFAULT_EPSILON = 1e-5
INSTANCE_NORM_DEFAULT_EPSILON = 1e-5


@dataclass(frozen=True)
class ChannelOp:
    check: Callable[[onnx.NodeProto, GraphIndex], str | None]
    out_axis: Callable[[onnx.NodeProto, GraphIndex, int], int | None]
    constant: ConstantFn
    params: tuple[int, ...] = ()


def _constants(slots: tuple[int, ...]):
    def check(node: onnx.NodeProto, index: GraphIndex) -> str | None:
        for slot in slots:
            if len(node.input) > slot and node.input[slot] and not index.is_constant(node.input[slot]):
                return f"input {slot} ('{node.input[slot]}') is not a constant"
        return None

    return check


def _channels_first(node: onnx.NodeProto, index: GraphIndex, axis: int) -> int | None:
    return 1 if axis == 1 else None


def _same(known, value, node, index):
    return known, value


def _param(node: onnx.NodeProto, index: GraphIndex, slot: int) -> np.ndarray:
    return index.array(node.input[slot]).astype(np.float64).reshape(-1)


# BatchNormalization ---------------------------------------------------------------------

def _check_batch_norm(node, index):
    if attribute(node, "training_mode", 0):
        return "BatchNormalization in training mode"
    if any(name for name in node.output[1:]):
        return "BatchNormalization with running-statistics outputs"
    return _constants((1, 2, 3, 4))(node, index)


def _batch_norm(known, value, node, index):
    scale, bias, mean, var = (_param(node, index, slot) for slot in (1, 2, 3, 4))
    eps = attribute(node, "epsilon", BATCH_NORM_DEFAULT_EPSILON)
    # Same order as the runtime: (x - mean) / sqrt(var + eps) * scale + B, with eps in float32.
    eps = float(np.float32(eps))
    with np.errstate(divide="ignore", invalid="ignore"):
        normalized = (value - mean) / np.sqrt(var + eps) * scale + bias
    # A channel with scale 0 is B for every finite input (network slimming leaves these).
    return known | (scale == 0), np.where(scale == 0, bias, normalized)


# Depthwise Conv -------------------------------------------------------------------------

def _check_depthwise(node, index):
    if len(node.input) > 2 and node.input[2] and not index.is_constant(node.input[2]):
        return f"depthwise conv bias '{node.input[2]}' is not a constant"
    return None


def _depthwise(known, value, node, index):
    weight = index.array(node.input[1]).astype(np.float64)
    taps = weight.reshape(weight.shape[0], -1)
    zero_kernel = ~(taps != 0).any(axis=1)
    bias = _param(node, index, 2) if len(node.input) > 2 and node.input[2] else np.zeros(len(taps))
    exact = ~conv_has_padding(node) | (value == 0)
    known = zero_kernel | (known & exact)
    return known, np.where(zero_kernel, 0.0, value * taps.sum(axis=1)) + bias


# Pooling and resampling -----------------------------------------------------------------

def _check_max_pool(node, index):
    return "MaxPool with an indices output" if len(node.output) > 1 and node.output[1] else None


def _average_pool(known, value, node, index):
    counts_padding = attribute(node, "count_include_pad", 0)
    if counts_padding and (conv_has_padding(node) or attribute(node, "ceil_mode", 0)):
        # Padded zeros (and, in ceil mode, positions past the edge) may enter the average,
        # so only a zero channel is certain to stay constant.
        return known & (value == 0), value
    return known, value


def _check_pad(node, index):
    mode = attribute(node, "mode", b"constant")
    if index.opset < 11:
        pads = attribute(node, "pads", [])
    else:
        if not index.is_constant(node.input[1]):
            return "Pad with pads computed at run time"
        if len(node.input) > 3 and node.input[3]:
            return "Pad with an axes input"
        if len(node.input) > 2 and node.input[2] and not index.is_constant(node.input[2]):
            return "Pad with a constant_value computed at run time"
        pads = index.array(node.input[1]).tolist()
    rank = len(pads) // 2
    if rank < 2 or pads[1] != 0 or pads[1 + rank] != 0:
        return "Pad that pads the channel axis"
    if mode not in (b"constant", b"reflect", b"edge", "constant", "reflect", "edge"):
        return f"Pad mode {mode!r}"
    return None


def _pad(known, value, node, index):
    mode = attribute(node, "mode", b"constant")
    if mode not in (b"constant", "constant"):
        return known, value  # reflect and edge copy the channel's own values
    if index.opset < 11:
        fill = attribute(node, "value", 0.0)
    elif len(node.input) > 2 and node.input[2]:
        fill = float(index.array(node.input[2]))
    else:
        fill = 0.0
    return known & (value == fill), value


def _check_resize(node, index):
    mode = attribute(node, "coordinate_transformation_mode", b"half_pixel")
    if mode in (b"tf_crop_and_resize", "tf_crop_and_resize"):
        return "Resize with tf_crop_and_resize"
    scales_slot = 1 if node.op_type == "Upsample" or index.opset < 11 else 2
    for slot in (scales_slot, 3):
        if len(node.input) > slot and node.input[slot]:
            if not index.is_constant(node.input[slot]):
                return f"Resize input {slot} ('{node.input[slot]}') is computed at run time"
            values = index.array(node.input[slot])
            if slot == scales_slot and values.size and values.reshape(-1)[1] != 1:
                return "Resize that scales the channel axis"
    if attribute(node, "axes") is not None:
        return "Resize with an axes attribute"
    return None


def _instance_norm(known, value, node, index):
    # A constant channel has zero variance and x - mean = 0, so the output is B. The runtime's
    # float32 mean of a nonzero constant is off by a few ulps, which the division by
    # sqrt(eps) magnifies, so only a zero channel is certain to give exactly B.
    scale = _param(node, index, 1)
    known = (known & (value == 0)) | (scale == 0)
    return known, np.broadcast_to(_param(node, index, 2), value.shape).copy()


# Axis-moving ops ------------------------------------------------------------------------

def _reduce_axes(node, index) -> list[int] | None:
    rank = index.rank(node.input[0])
    if rank is None:
        return None
    axes = attribute(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = index.array(node.input[1]).tolist() if index.is_constant(node.input[1]) else None
        if axes is None:
            return None
    if axes is None:
        return list(range(rank))
    return sorted(a + rank if a < 0 else a for a in axes)


def _check_reduce(node, index):
    if _reduce_axes(node, index) is None:
        return f"{node.op_type} with axes computed at run time"
    return None


def _reduce_out_axis(node, index, axis):
    axes = _reduce_axes(node, index)
    if axes is None or axis in axes:
        return None
    if attribute(node, "keepdims", 1):
        return axis
    return axis - sum(1 for a in axes if a < axis)


def _transpose_out_axis(node, index, axis):
    perm = attribute(node, "perm")
    rank = index.rank(node.input[0])
    if perm is None:
        perm = list(range(rank))[::-1] if rank is not None else None
    return None if perm is None else list(perm).index(axis)


def _squeeze_axes(node, index) -> list[int] | None:
    axes = attribute(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        if not index.is_constant(node.input[1]):
            return None
        axes = index.array(node.input[1]).tolist()
    return axes


def _check_squeeze(node, index):
    if _squeeze_axes(node, index) is None:
        return f"{node.op_type} without constant axes"
    return None


def _squeeze_out_axis(node, index, axis):
    rank = index.rank(node.input[0])
    axes = [a + rank if a < 0 else a for a in _squeeze_axes(node, index)]
    return None if axis in axes else axis - sum(1 for a in axes if a < axis)


def _unsqueeze_out_axis(node, index, axis):
    out_rank = index.rank(node.output[0])
    axes = sorted(a + out_rank if a < 0 else a for a in _squeeze_axes(node, index))
    position = axis
    for a in axes:
        if a <= position:
            position += 1
    return position


def _no_check(node, index):
    return None


def _check_expand(node, index):
    if not index.is_constant(node.input[1]):
        return "Expand with a shape computed at run time"
    return None


def _expand_out_axis(node, index, axis):
    rank, out_rank = index.rank(node.input[0]), index.rank(node.output[0])
    return None if rank is None or out_rank is None else axis + out_rank - rank


CHANNEL_OPS: dict[str, ChannelOp] = {
    "BatchNormalization": ChannelOp(_check_batch_norm, _channels_first, _batch_norm, params=(1, 2, 3, 4)),
    "InstanceNormalization": ChannelOp(_constants((1, 2)), _channels_first, _instance_norm, params=(1, 2)),
    "DepthwiseConv": ChannelOp(_check_depthwise, _channels_first, _depthwise, params=(1, 2)),
    "MaxPool": ChannelOp(_check_max_pool, _channels_first, _same),
    "AveragePool": ChannelOp(_no_check, _channels_first, _average_pool),
    "GlobalAveragePool": ChannelOp(_no_check, _channels_first, _same),
    "GlobalMaxPool": ChannelOp(_no_check, _channels_first, _same),
    "Pad": ChannelOp(_check_pad, _channels_first, _pad),
    "Resize": ChannelOp(_check_resize, _channels_first, _same),
    "Upsample": ChannelOp(_check_resize, _channels_first, _same),
    "ReduceMean": ChannelOp(_check_reduce, _reduce_out_axis, _same),
    "ReduceMax": ChannelOp(_check_reduce, _reduce_out_axis, _same),
    "ReduceMin": ChannelOp(_check_reduce, _reduce_out_axis, _same),
    "Transpose": ChannelOp(_no_check, _transpose_out_axis, _same),
    "Expand": ChannelOp(_check_expand, _expand_out_axis, _same),
    "Squeeze": ChannelOp(_check_squeeze, _squeeze_out_axis, _same),
    "Unsqueeze": ChannelOp(_check_squeeze, _unsqueeze_out_axis, _same),
}


def channel_op_key(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    """Return the table key for ``node``, or None if it is not a channel-wise op."""
    if node.op_type == "Conv" and is_depthwise(index, node):
        return "DepthwiseConv"
    return node.op_type if node.op_type in CHANNEL_OPS else None


def in_axis_for(op: ChannelOp, node: onnx.NodeProto, index: GraphIndex, out_axis: int) -> int | None:
    """Invert ``op.out_axis``: the input axis that lands on ``out_axis``."""
    rank = index.rank(node.input[0])
    if rank is None:
        return None
    for axis in range(rank):
        if op.out_axis(node, index, axis) == out_axis:
            return axis
    return None
