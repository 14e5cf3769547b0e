"""Export a torch model to one self-contained ONNX file with either torch exporter."""

from __future__ import annotations

import os
import warnings
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
    Further keyword arguments go to ``torch.onnx.export`` unchanged; a ``dynamic_axes`` or
    ``dynamic_shapes`` among them replaces the one ``dynamic_batch`` builds.

    The dynamo exporter writes the weights to an external data file. This function loads them
    back, saves the model as one file and deletes the data file, so the model must stay under
    protobuf's 2 GB limit.

    The dynamo exporter translates at opset 18 or later and converts down to ``opset``. When
    the conversion fails it keeps opset 18, and this function warns with the opset written.
    With torch 2.13 and onnxscript 0.7 that happens for every ``ReduceMean``, which is how a
    global average pool or ``Tensor.mean`` exports. The same conversion writes ``chunk`` at
    opset 17 as a ``Split`` with ``num_outputs``, which the checker rejects.
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
                    f"example input(s) {small} have batch size 1, which torch.export cannot make dynamic. "
                    "Pass a batch of at least 2 with dynamo=True, or set dynamic_batch=False"
                )
            batch = torch.export.Dim(BATCH_DIM)
            dynamic_shapes = tuple({0: batch} for _ in examples)
        options = {"dynamic_shapes": dynamic_shapes, "verbose": False, **export_options}
        torch.onnx.export(
            model, examples, path, dynamo=True, opset_version=opset,
            input_names=input_names, output_names=output_names, **options,
        )
        _inline_external_data(path)
        written = _default_opset(onnx.load(path, load_external_data=False))
        if written != opset:
            warnings.warn(f"{path}: the dynamo exporter wrote opset {written}, not the requested {opset}", stacklevel=2)
    else:
        dynamic_axes = None
        if dynamic_batch:
            dynamic_axes = {name: {0: BATCH_DIM} for name in input_names + output_names}
        options = {"dynamic_axes": dynamic_axes, **export_options}
        torch.onnx.export(
            model, examples, path, dynamo=False, opset_version=opset,
            input_names=input_names, output_names=output_names, **options,
        )
    return path


def _inline_external_data(path: Path) -> None:
    """Move every tensor stored in an external data file into the model file and delete the data files.

    The exporter writes ``<path>.data`` even when every tensor is small enough to stay inline,
    so that file is deleted too.
    """
    model = onnx.load(path, load_external_data=False)
    data_files = {
        path.parent / ExternalDataInfo(tensor).location
        for tensor in _all_tensors(model)
        if uses_external_data(tensor)
    }
    if data_files:
        onnx.load_external_data_for_model(model, str(path.parent))
        onnx.save(model, path)
    data_files.add(path.with_name(path.name + ".data"))
    for data_file in data_files:
        data_file.unlink(missing_ok=True)


def _default_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
