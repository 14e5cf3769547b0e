"""Bring a loaded model into the form the analysis expects, without touching the original.

The pass works on a copy and does five things:

- turns ``Constant`` nodes into initializers;
- folds nodes whose inputs are all initializers (for example ``weight_orig * weight_mask``
  left by ``torch.nn.utils.prune``, or a Transpose of a weight) with the ONNX reference
  evaluator;
- removes ``Identity`` nodes and inference-mode ``Dropout`` nodes whose output is not a graph
  output, rewiring their consumers to the input;
- folds shape computations that depend only on static dims (see ``shape_fold``);
- names unnamed nodes and runs ONNX shape inference so that every tensor has a rank.

It refuses nothing: a node it does not recognize is left as it is for the analysis to treat
as a barrier.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from .graph import subgraph_references
from .shape_fold import fold_shape_computations

logger = logging.getLogger(__name__)

# Ops that are folded when all their inputs are initializers. They are deterministic and
# their output is never much larger than their inputs.
# A fold may create a tensor larger than its inputs (ConstantOfShape, Range, Tile of shape
# constants) up to this many elements.
FOLD_GROWTH_LIMIT = 256

FOLDABLE_OPS = {
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Reciprocal", "Pow", "Exp", "Log",
    "Transpose", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Identity",
    "Gather", "Slice", "Min", "Max", "Clip", "Relu", "Sign", "Equal", "Where",
    "ConstantOfShape", "Range", "Expand", "Tile", "Split", "Not", "Less", "Greater",
}


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a normalized copy of ``model``; the argument is not modified."""
    model = _copy(model)
    graph = model.graph

    _name_nodes(graph)
    _constants_to_initializers(graph)
    _fold_constant_nodes(graph)
    _remove_identities(graph)
    _remove_unused_initializers(graph)

    # Shape computations can only be folded once shape inference has found the static dims.
    model = fold_shape_computations(infer_shapes(model))
    _remove_unused_initializers(model.graph)
    return infer_shapes(model)


# Initializers larger than this are replaced by their dims alone for shape inference, which
# does not need their values. The skeleton then stays far below protobuf's 2 GiB limit.
SKELETON_MAX_ELEMENTS = 4096


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop intermediate ``value_info`` and infer it again from the current graph."""
    del model.graph.value_info[:]
    skeleton = onnx.ModelProto(ir_version=model.ir_version)
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims)) > SKELETON_MAX_ELEMENTS:
            graph.initializer.append(onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims))
        else:
            graph.initializer.append(tensor)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError) as exc:
        # Without shapes the analysis keeps every unit it cannot place, so this is safe.
        logger.warning("ONNX shape inference failed (%s); tensors without shapes are kept whole", exc)
        return model
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node a unique name: reports and the layer history are keyed by it."""
    taken: set[str] = set()
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = ReferenceEvaluator(_single_node_model(node, [])).run(None, {})[0]
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), node.output[0]))
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _fold_constant_nodes(graph: onnx.GraphProto) -> None:
    constants = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        foldable = (
            node.op_type in FOLDABLE_OPS
            and node.domain in ("", "ai.onnx")
            and all(name == "" or name in constants for name in node.input)
            and any(name for name in node.input)
            and not any(name in graph_outputs for name in node.output)
        )
        if not foldable:
            kept.append(node)
            continue
        inputs = [constants[name] for name in node.input if name]
        try:
            values = ReferenceEvaluator(_single_node_model(node, inputs)).run(None, {})
        except Exception as exc:  # noqa: BLE001 - any evaluator failure just means "do not fold"
            logger.debug("not folding %s (%s): %s", node.name, node.op_type, exc)
            kept.append(node)
            continue
        produced = sum(np.asarray(v).size for v in values)
        if produced > max(FOLD_GROWTH_LIMIT, sum(int(np.prod(t.dims)) for t in inputs)):
            kept.append(node)  # folding would store a larger tensor than it removes (a broadcast)
            continue
        for name, value in zip(node.output, values):
            tensor = numpy_helper.from_array(np.asarray(value), name)
            graph.initializer.append(tensor)
            constants[name] = tensor
        logger.debug("folded constant node %s (%s)", node.name, node.op_type)
    del graph.node[:]
    graph.node.extend(kept)


def _single_node_model(node: onnx.NodeProto, inputs: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        [node],
        "fold",
        [],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None) for name in node.output],
        initializer=inputs,
    )
    return onnx.helper.make_model(graph)


def _is_inference_dropout(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> bool:
    if node.op_type != "Dropout":
        return False
    if len(node.output) > 1 and node.output[1]:
        return False
    if len(node.input) >= 3 and node.input[2]:
        training = constants.get(node.input[2])
        if training is None or bool(numpy_helper.to_array(training)):
            return False
    return True


def _remove_identities(graph: onnx.GraphProto) -> None:
    constants = {t.name: t for t in graph.initializer}
    # Names read inside If/Loop/Scan bodies are not rewired, so their Identity nodes stay.
    keep_names = {o.name for o in graph.output} | subgraph_references(graph)
    rename: dict[str, str] = {}
    kept = []
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in rename:
                node.input[slot] = rename[name]
        passthrough = node.op_type == "Identity" or _is_inference_dropout(node, constants)
        if passthrough and node.output[0] not in keep_names:
            rename[node.output[0]] = node.input[0]
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _remove_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    listed_as_input = {i.name for i in graph.input}
    kept = [t for t in graph.initializer if t.name in used or t.name in listed_as_input]
    del graph.initializer[:]
    graph.initializer.extend(kept)
