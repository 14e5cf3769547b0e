"""The torch side: ``export_onnx`` with both exporters, and the reference models against torch."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx.external_data_helper import uses_external_data

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")  # the dynamo exporter translates through onnxscript

from conv_helpers import EXPORTERS, io_dims, run  # noqa: E402
from onnx_squeeze.train.export import export_onnx  # noqa: E402
from onnx_squeeze.train.models import (  # noqa: E402
    MLP,
    LeNet300,
    MobileNetV2,
    ResNet,
    SENet,
    convnext_small_test,
    convnext_tiny,
)
from onnx_squeeze.train.weights import fill_seeded  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
    pytest.mark.filterwarnings("ignore:The feature will be removed"),
]

MODELS = {
    "mlp": (lambda: MLP((6, 8, 3), "tanh"), (6,)),
    "lenet300": (LeNet300, (784,)),
    "resnet": (ResNet, (1, 28, 28)),
    "senet": (SENet, (1, 28, 28)),
    "mobilenet_v2": (MobileNetV2, (1, 28, 28)),
    "convnext_small_test": (convnext_small_test, (3, 32, 32)),
}


def _inputs(batch: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _assert_matches_torch(model, path, shape) -> None:
    proto = onnx.load(path)
    for batch in (1, 3):
        x = _inputs(batch, shape, seed=batch)
        with torch.no_grad():
            want = model(x).numpy()
        (got,) = run(proto, {"x": x.numpy()})
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=f"batch {batch}")


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(MODELS))
def test_model_export_matches_torch(tmp_path, name, exporter):
    factory, shape = MODELS[name]
    model = fill_seeded(factory(), seed=0)
    path = tmp_path / "model.onnx"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        returned = export_onnx(model, _inputs(2, shape, seed=0), path, dynamo=exporter == "dynamo")

    assert returned == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"], "an external data file was left behind"
    proto = onnx.load(path, load_external_data=False)
    assert not any(uses_external_data(t) for t in proto.graph.initializer)
    onnx.checker.check_model(proto, full_check=True)
    assert [name for name, _ in io_dims(proto)] == ["x", "y"]
    assert all(dims[0] == "batch" for _, dims in io_dims(proto))
    written = next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    opset_warned = any("wrote opset" in str(w.message) for w in caught)
    assert opset_warned == (written != 17)
    _assert_matches_torch(model, path, shape)


def test_dynamo_rejects_batch_one(tmp_path):
    with pytest.raises(ValueError, match="batch size 1"):
        export_onnx(MLP((6, 3)), torch.zeros(1, 6), tmp_path / "m.onnx", dynamo=True)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_fixed_batch_export(tmp_path, exporter):
    path = export_onnx(MLP((6, 3)).eval(), torch.zeros(1, 6), tmp_path / "m.onnx", dynamo=exporter == "dynamo",
                       dynamic_batch=False)
    assert io_dims(onnx.load(path)) == [("x", [1, 6]), ("y", [1, 3])]


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_convnext_tiny_export_matches_torch(tmp_path, exporter):
    model = fill_seeded(convnext_tiny(num_classes=10), seed=0)
    assert sum(p.numel() for p in model.parameters()) == 27_827_818
    path = export_onnx(model, _inputs(2, (3, 64, 64), seed=0), tmp_path / "model.onnx", dynamo=exporter == "dynamo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    _assert_matches_torch(model.eval(), path, (3, 64, 64))
