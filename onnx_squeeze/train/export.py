"""Export a torch model to one self-contained ONNX file with either torch exporter."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

BATCH_DIM = "batch"


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    *,
    dynamo: bool,
    opset: int = 17,
    input_names: Sequence[str] = ("x",),
    output_names: Sequence[str] = ("y",),
    dynamic_batch: bool = True,
    **export_options,
) -> Path:
    """Export ``model.eval()`` on ``example`` to ``path`` and return the path.

    ``dynamo=False`` runs the TorchScript exporter and ``dynamo=True`` the torch.export-based
    one. With ``dynamic_batch`` axis 0 of every input and output becomes the symbolic dim
    ``batch``. The dynamo exporter needs an example batch of at least 2 for that, because
    torch.export specializes a dim of size 1, so this function raises ValueError otherwise.
    Further keyword arguments go to ``torch.onnx.export`` unchanged.

    The dynamo exporter writes the weights to an external data file. This function loads them
    back, saves the model as one file and deletes the data file, so the model must stay under
    protobuf's 2 GB limit.
    """
    path = Path(path)
    examples = example if isinstance(example, tuple) else (example,)
    input_names, output_names = list(input_names), list(output_names)
    model = model.eval()

    if dynamo:
        dynamic_shapes = None
        if dynamic_batch:
            small = [name for name, tensor in zip(input_names, examples) if tensor.shape[0] < 2]
            if small:
                raise ValueError(
                    f"example input(s) {small} have batch size 1; pass a batch of at least 2 "
                    "for a dynamic batch with dynamo=True, or set dynamic_batch=False"
                )
            batch = torch.export.Dim(BATCH_DIM)
            dynamic_shapes = tuple({0: batch} for _ in examples)
        torch.onnx.export(
            model, examples, path, dynamo=True, opset_version=opset,
            input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes, verbose=False, **export_options,
        )
        _inline_external_data(path)
    else:
        dynamic_axes = None
        if dynamic_batch:
            dynamic_axes = {name: {0: BATCH_DIM} for name in input_names + output_names}
        torch.onnx.export(
            model, examples, path, dynamo=False, opset_version=opset,
            input_names=input_names, output_names=output_names,
            dynamic_axes=dynamic_axes, **export_options,
        )
    return path


def _inline_external_data(path: Path) -> None:
    """Move every tensor stored in an external data file into the model file itself."""
    model = onnx.load(path, load_external_data=False)
    data_files = {
        ExternalDataInfo(tensor).location
        for tensor in _all_tensors(model)
        if uses_external_data(tensor)
    }
    if not data_files:
        return
    onnx.load_external_data_for_model(model, str(path.parent))
    onnx.save(model, path)
    for location in data_files:
        (path.parent / location).unlink(missing_ok=True)


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
