"""Split and Slice on the channel axis: which input channel each output channel is.

Both ops select channels by position, so output channel k is input channel ``selection[k]``
and the two are coupled; input channels that no output selects are not read by the node.
After channels are removed the positions change, and the rewrite recomputes the split sizes
or the slice bounds from the kept channels:

- Split: the new size of each output is its number of kept channels, written in the form
  of the model's opset (the ``split`` attribute below opset 13, an input from 13 on; an
  equal split by ``num_outputs`` stays one only while the sizes stay equal).
- Slice with step 1: the kept channels are contiguous again, so new starts and ends are
  exact; an end past the last channel (an open end such as INT64_MAX) stays open.
- Slice with another step: kept only if the new positions still have that step; otherwise
  the node becomes a Gather of the same positions, which computes the same tensor.

A Slice that cuts the channel axis together with other axes, or whose bounds are computed
at run time, is a barrier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .graph import GraphIndex, attribute

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


def _normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# Split ------------------------------------------------------------------------------------

def split_axis(node: onnx.NodeProto, index: GraphIndex) -> int:
    return _normalize_axis(attribute(node, "axis", 0), index.rank(node.input[0]) or 0)


def split_sizes(node: onnx.NodeProto, index: GraphIndex, total: int) -> list[int] | None:
    """Return the size of each output along the split axis, or None if not constant."""
    if index.opset < 13:
        sizes = attribute(node, "split")
    elif len(node.input) > 1 and node.input[1]:
        if not index.is_constant(node.input[1]):
            return None
        sizes = index.array(node.input[1]).tolist()
    else:
        sizes = None
    if sizes is not None:
        return [int(s) for s in sizes]
    parts = len(node.output)
    chunk = -(-total // parts)  # opset 18: the last chunk may be smaller
    return [min(chunk, total - i * chunk) for i in range(parts)]


def split_check(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    if index.opset >= 13 and len(node.input) > 1 and node.input[1] and not index.is_constant(node.input[1]):
        return "Split with sizes computed at run time"
    return None


# Slice ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SliceSpec:
    """One Slice node's bounds: parallel lists over the sliced axes."""

    starts: list[int]
    ends: list[int]
    axes: list[int]
    steps: list[int]


def slice_spec(node: onnx.NodeProto, index: GraphIndex) -> SliceSpec | None:
    rank = index.rank(node.input[0])
    if rank is None:
        return None
    if index.opset < 10:
        starts, ends = attribute(node, "starts"), attribute(node, "ends")
        axes = attribute(node, "axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        values = []
        for slot in (1, 2, 3, 4):
            name = node.input[slot] if len(node.input) > slot else ""
            if name and not index.is_constant(name):
                return None
            values.append(index.array(name).astype(np.int64).tolist() if name else None)
        starts, ends, axes, steps = values
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
    axes = [_normalize_axis(a, rank) for a in axes]
    return SliceSpec(list(starts), list(ends), axes, list(steps))


def slice_check(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    if slice_spec(node, index) is None:
        return "Slice with bounds computed at run time"
    return None


def slice_selection(spec: SliceSpec, axis: int, size: int) -> np.ndarray | None:
    """Input positions selected along ``axis``; None if that axis is not sliced."""
    if axis not in spec.axes:
        return None
    i = spec.axes.index(axis)
    start, end, step = spec.starts[i], spec.ends[i], spec.steps[i]
    # Python's slice clamps exactly as the ONNX Slice operator specifies.
    return np.arange(size)[slice(int(start), int(end), int(step))]


def rewrite_slice(spec: SliceSpec, axis: int, old_size: int, new_positions: np.ndarray, new_size: int) -> tuple[int, int, int] | None:
    """New (start, end, step) on ``axis`` selecting ``new_positions``, or None for a Gather."""
    i = spec.axes.index(axis)
    end, step = spec.ends[i], spec.steps[i]
    if len(new_positions) > 1 and not (np.diff(new_positions) == step).all():
        return None
    first, last = int(new_positions[0]), int(new_positions[-1])
    open_end = (step > 0 and end >= old_size) or (step < 0 and end < -old_size)
    if open_end and ((step > 0 and last + step >= new_size) or (step < 0 and last + step < 0)):
        return first, end, step
    new_end = last + step
    if step < 0 and new_end < 0:
        new_end = INT64_MIN
    return first, new_end, step


def selections(index: GraphIndex, node, space) -> list[tuple[str, np.ndarray]] | None:
    """For Split and Slice on the channel axis: (output, selected input positions) pairs.

    Returns an empty list when the op does not cut the channel axis, and None when the
    selection cannot be followed (a Slice of the channel axis together with other axes).
    """
    source = node.input[0]
    axis, size = space.axis[source], space.size[source]
    if node.op_type == "Split":
        if split_axis(node, index) != axis:
            return []
        sizes = split_sizes(node, index, size)
        offsets = np.cumsum([0, *sizes])
        return [(name, np.arange(offsets[i], offsets[i + 1])) for i, name in enumerate(node.output) if name]
    spec = slice_spec(node, index)
    selected = slice_selection(spec, axis, size)
    if selected is None:
        return []
    if len(spec.axes) > 1:
        return None
    return [(node.output[0], selected)]
