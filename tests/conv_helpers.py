"""Export, inspection and comparison helpers for the tests on torch-exported conv models.

Tests find layers by the shape of their stored weight, in graph order, because the two
exporters name nodes and weights differently. The TorchScript exporter also renames a Conv
weight when it folds a BatchNorm into it. The report of ``onnx_squeeze.minimize`` names
layers by node, and the minimizer keeps node names, so a layer found in the input model is
looked up by the same node name in the result.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import onnx_squeeze

ATOL = 1e-5
RTOL = 1e-5
BATCH_SIZES = (1, 3)
EXPORTERS = ("torchscript", "dynamo")
# Slice ends at or above this are "to the end of the axis" (torch writes INT64_MAX).
OPEN_END = 2**31 - 1

_counter = itertools.count()


def export(model, example, tmp_path: Path, exporter: str, *, opset: int = 17, **options) -> onnx.ModelProto:
    """Export ``model`` with ``onnx_squeeze.train.export.export_onnx`` and load the file."""
    from onnx_squeeze.train.export import export_onnx

    path = Path(tmp_path) / f"model_{next(_counter)}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, example, path, dynamo=exporter == "dynamo", opset=opset, **options)
    model_proto = onnx.load(path)
    onnx.checker.check_model(model_proto, full_check=True)
    return model_proto


# ---------------------------------------------------------------------------------------------
# Inspecting weight ops


@dataclass
class WeightOp:
    """A Conv, Gemm or MatMul node with a constant weight, as stored (no transpose applied)."""

    node: str
    op_type: str
    weight_name: str
    weight: np.ndarray
    bias: np.ndarray | None
    group: int


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    identity = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    for name, source in identity.items():
        while source in identity:
            source = identity[source]
        if source in values:
            values[name] = values[source]
    return values


def constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """Return the value of an initializer or Constant output, through Identity nodes."""
    return _constants(model).get(name)


def weight_ops(model: onnx.ModelProto) -> list[WeightOp]:
    """List Conv, Gemm and MatMul nodes with a constant weight, in graph order.

    The bias is Conv's third input, Gemm's C, or for MatMul the constant operand of an
    ``Add`` that is the MatMul output's only consumer.
    """
    values = _constants(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    ops = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in values:
            continue
        bias = None
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
            bias = values.get(node.input[2])
        elif node.op_type == "MatMul":
            readers = consumers.get(node.output[0], [])
            if len(readers) == 1 and readers[0].op_type == "Add":
                other = [name for name in readers[0].input if name != node.output[0]]
                bias = values.get(other[0]) if other else None
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        ops.append(WeightOp(node.name, node.op_type, node.input[1], values[node.input[1]], bias, group))
    return ops


def ops_by_shape(model: onnx.ModelProto, shape: tuple[int, ...]) -> list[WeightOp]:
    """Return the weight ops whose stored weight has ``shape``, in graph order."""
    return [op for op in weight_ops(model) if tuple(op.weight.shape) == tuple(shape)]


def op_by_shape(model: onnx.ModelProto, shape: tuple[int, ...]) -> WeightOp:
    """Return the one weight op whose stored weight has ``shape``."""
    found = ops_by_shape(model, shape)
    shapes = [tuple(op.weight.shape) for op in weight_ops(model)]
    assert len(found) == 1, f"expected one weight op with weight shape {shape}, found {len(found)} among {shapes}"
    return found[0]


def op_named(model: onnx.ModelProto, node: str) -> WeightOp:
    """Return the weight op of the node called ``node``."""
    ops = {op.node: op for op in weight_ops(model)}
    assert node in ops, f"node {node!r} is not a weight op of the minimized model; weight ops: {sorted(ops)}"
    return ops[node]


def removed_units(result: onnx_squeeze.MinimizeResult, node: str) -> tuple[list[int], list[int]]:
    """Return (removed output units, removed input units) of ``node`` from the report, original numbering."""
    for entry in result.report["layers"]:
        if entry["node"] == node:
            return sorted(entry["removed_output_units"]), sorted(entry["removed_input_units"])
    return [], []


# ---------------------------------------------------------------------------------------------
# Running and comparing


def feeds_for(model: onnx.ModelProto, sizes: dict[str, int] | int, seed: int = 123) -> dict[str, np.ndarray]:
    """Return seeded normal inputs. A symbolic dim takes ``sizes[name]``, or ``sizes`` when it is an int."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = []
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            else:
                dims.append(sizes if isinstance(sizes, int) else sizes[d.dim_param])
        feeds[value.name] = (2 * rng.standard_normal(dims)).astype(np.float32)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_outputs(original, minimized, sizes=BATCH_SIZES, *, atol=ATOL, rtol=RTOL) -> None:
    """Compare every output in onnxruntime on seeded inputs at each entry of ``sizes``."""
    for size in sizes:
        feeds = feeds_for(original, size)
        for index, (want, got) in enumerate(zip(run(original, feeds), run(minimized, feeds))):
            assert got.shape == want.shape, f"output {index} at sizes {size}: shape {got.shape}, expected {want.shape}"
            np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=f"output {index} at sizes {size}")


def check_result(original: onnx.ModelProto, result, *, sizes=BATCH_SIZES, atol=ATOL, rtol=RTOL) -> None:
    """Check what every minimized model must satisfy.

    The checks: verification passed, outputs equal on seeded inputs at ``sizes``, the full
    checker passes, graph inputs and outputs keep names, dtypes and dims (symbolic ones by
    name), and a second run changes nothing. The size check is ``assert_not_larger``, which
    tests call last so that a size failure does not hide a structural one.
    """
    assert result.verification is not None and result.verification.passed, result.verification.message
    assert_same_outputs(original, result.model, sizes, atol=atol, rtol=rtol)
    onnx.checker.check_model(result.model, full_check=True)

    def interface(model):
        initializers = {t.name for t in model.graph.initializer}
        values = [v for v in model.graph.input if v.name not in initializers] + list(model.graph.output)
        return [(v.name, v.type.tensor_type.elem_type) for v in values]

    assert interface(result.model) == interface(original)
    assert io_dims(result.model) == io_dims(original)

    again = onnx_squeeze.minimize(result.model, verify_outputs=False)
    assert not again.changed, f"a second run removed more: {again.report['layers']}"


def assert_not_larger(original: onnx.ModelProto, result) -> None:
    # The provenance record in metadata_props (a few hundred bytes) is not counted: on
    # models of a few kilobytes it can outweigh what the removal saves.
    stripped = onnx.ModelProto()
    stripped.CopyFrom(result.model)
    for prop in list(stripped.metadata_props):
        if prop.key == "onnx_squeeze":
            stripped.metadata_props.remove(prop)
    before, after = original.ByteSize(), stripped.ByteSize()
    assert after <= before, f"the minimized model has {after} bytes, its input {before}"


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def io_dims(model: onnx.ModelProto) -> list[tuple[str, list[str | int]]]:
    """Name and dims (dim_param name or dim_value) of every graph input and output."""
    values = _real_inputs(model) + list(model.graph.output)
    return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]


def minimize_and_check(original: onnx.ModelProto, *, sizes=BATCH_SIZES, atol=ATOL, rtol=RTOL, **options):
    """Minimize ``original``, check that the argument is untouched, run ``check_result`` and return the result."""
    before = original.SerializeToString()
    result = onnx_squeeze.minimize(original, **options)
    assert original.SerializeToString() == before, "minimize() modified its argument"
    check_result(original, result, sizes=sizes, atol=atol, rtol=rtol)
    return result
