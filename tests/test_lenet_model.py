"""The bundled pruned LeNet-300-100: minimized, verified, and just as accurate on MNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnx_squeeze

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "lenet300_mnist_pruned.onnx"
MNIST = REPO.parent / "shared" / "datasets" / "mnist" / "mnist.npz"


def _predict(model: onnx.ModelProto, pixels: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": pixels})[0].argmax(axis=1)


@pytest.fixture(scope="module")
def minimized():
    return onnx_squeeze.minimize(onnx.load(MODEL), prune_inputs=True)


def test_bundled_model_shrinks_and_verifies(minimized):
    report = minimized.report
    assert minimized.verification.passed
    assert report["params_after"] < 0.6 * report["params_before"]
    assert report["nonzero_after"] <= report["nonzero_before"]
    assert minimized.model.graph.input[0].name == "pixels"
    assert minimized.model.graph.output[0].name == "logits"


@pytest.mark.skipif(not MNIST.is_file(), reason=f"MNIST not found at {MNIST}")
def test_bundled_model_accuracy_unchanged(minimized):
    data = np.load(MNIST)
    pixels = data["x_test"].reshape(-1, 784).astype(np.float32) / 255.0
    labels = data["y_test"]

    before = _predict(onnx.load(MODEL), pixels)
    after = _predict(minimized.model, pixels)
    assert (before == after).all()
    assert (before == labels).mean() > 0.97
