"""Helpers that build small ONNX models in code and compare models in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

OPSET = 17
ATOL = 1e-5
RTOL = 1e-5


class GraphBuilder:
    """Append nodes and initializers with generated names; ``model()`` finishes the graph."""

    def __init__(self, input_shape=("N", 6), input_name="x", opset=OPSET):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs = [helper.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, list(input_shape))]
        self.opset = opset
        self._count = 0

    def name(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    def const(self, array, base: str = "c") -> str:
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_outputs: int = 1, **attrs) -> str | list[str]:
        outputs = [self.name(op_type.lower()) for _ in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.name(op_type), **attrs))
        return outputs[0] if n_outputs == 1 else outputs

    def gemm(self, x: str, weight_in_out: np.ndarray, bias: np.ndarray | None, *, trans_b: int = 1, **attrs) -> str:
        """Gemm with the weight stored [out, in] (trans_b=1) or [in, out] (trans_b=0)."""
        stored = weight_in_out.T.copy() if trans_b else weight_in_out
        inputs = [x, self.const(stored.astype(np.float32), "W")]
        if bias is not None:
            inputs.append(self.const(np.asarray(bias, np.float32), "b"))
        return self.op("Gemm", inputs, transB=trans_b, **attrs)

    def linear_matmul(self, x: str, weight_in_out: np.ndarray, bias: np.ndarray | None) -> str:
        """MatMul with a [in, out] weight, plus an Add of the bias, as exporters write it."""
        y = self.op("MatMul", [x, self.const(weight_in_out.astype(np.float32), "W")])
        if bias is not None:
            y = self.op("Add", [y, self.const(np.asarray(bias, np.float32), "b")])
        return y

    def model(self, outputs: list[str] | str, output_shapes=None) -> onnx.ModelProto:
        outputs = [outputs] if isinstance(outputs, str) else outputs
        output_shapes = output_shapes or [None] * len(outputs)
        graph = helper.make_graph(
            self.nodes,
            "test",
            self.inputs,
            [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, s) for o, s in zip(outputs, output_shapes)],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model = onnx.shape_inference.infer_shapes(model)
        # Graph outputs get the inferred shapes so the symbolic batch dim is declared.
        inferred = {v.name: v for v in model.graph.value_info}
        for output in model.graph.output:
            if output.name in inferred and not output.type.tensor_type.HasField("shape"):
                output.CopyFrom(inferred[output.name])
        onnx.checker.check_model(model, full_check=True)
        return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def seeded_feeds(model: onnx.ModelProto, batch: int, seed: int = 123) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = (rng.standard_normal(dims) * 2).astype(np.float32)
    return feeds


def assert_same_outputs(original, minimized, batches=(1, 3), atol=ATOL, rtol=RTOL) -> None:
    for batch in batches:
        feeds = seeded_feeds(original, batch)
        for want, got in zip(run(original, feeds), run(minimized, feeds)):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)


def initializer_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in model.graph.initializer}


def float_params(model: onnx.ModelProto) -> int:
    return sum(
        int(np.prod(t.dims))
        for t in model.graph.initializer
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
    )


def weights(rng: np.random.Generator, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded [in, out] weight and [out] bias, away from zero."""
    w = rng.uniform(0.2, 1.0, (n_in, n_out)) * rng.choice([-1, 1], (n_in, n_out))
    b = rng.uniform(-0.5, 0.5, n_out)
    return w.astype(np.float32), b.astype(np.float32)
