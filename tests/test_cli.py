"""The onnx-squeeze command: outputs, reports, external data and every input error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from builders import GraphBuilder, assert_same_outputs, seeded_feeds, weights
from onnx_squeeze.cli import main


@pytest.fixture
def model():
    rng = np.random.default_rng(0)
    (w1, b1), (w2, b2), (w3, b3) = weights(rng, 6, 16), weights(rng, 16, 16), weights(rng, 16, 3)
    w1[:, [1, 9]] = 0.0
    w1[3, :] = 0.0  # input feature 3 is unused
    b1[9] = 0.4
    w2[:, 4] = 0.0
    w3[7, :] = 0.0
    b = GraphBuilder()
    h = b.op("Relu", [b.gemm("x", w1, b1)])
    h = b.op("Relu", [b.gemm(h, w2, b2)])
    return b.model(b.gemm(h, w3, b3))


@pytest.fixture
def model_path(tmp_path, model):
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _error_line(result):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("onnx-squeeze: error: ")
    assert "Traceback" not in result.output
    return lines[0]


def _files(directory):
    return sorted(p.name for p in directory.iterdir())


def test_minimize_writes_verified_model_and_report(tmp_path, model, model_path):
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    result = invoke("minimize", model_path, "-o", out, "--report", report_path)
    assert result.exit_code == 0, result.output
    assert "verification: passed" in result.output
    assert "dense parameters" in result.output

    report = json.loads(report_path.read_text())
    assert report["verified"] is True
    assert report["params_after"] < report["params_before"]
    assert report["bytes_after"] == out.stat().st_size
    assert report["bytes_before"] == model_path.stat().st_size
    assert {layer["weight"] for layer in report["layers"]}
    minimized = onnx.load(out)
    onnx.checker.check_model(minimized, full_check=True)
    assert_same_outputs(model, minimized)
    assert any(p.key == "onnx_squeeze" for p in minimized.metadata_props)


def test_inspect_writes_nothing(tmp_path, model_path):
    before = _files(tmp_path)
    result = invoke("inspect", model_path)
    assert result.exit_code == 0, result.output
    assert "dense parameters" in result.output
    assert _files(tmp_path) == before


def test_verbose_names_kept_units(tmp_path, model_path):
    result = invoke("minimize", model_path, "-o", tmp_path / "out.onnx", "-v")
    assert result.exit_code == 0
    assert "graph input" in result.output


def test_external_data_in_and_out(tmp_path, monkeypatch):
    # Three Linear(64, 64) layers with some rows zero, as in the external-data report.
    rng = np.random.default_rng(21)
    b = GraphBuilder(input_shape=("N", 64))
    h = "x"
    for layer in range(3):
        w, bias = weights(rng, 64, 64)
        if layer < 2:
            w[:, 10 * layer: 10 * layer + 12] = 0.0
        h = b.gemm(h, w, bias)
        h = b.op("Relu", [h]) if layer < 2 else h
    model = b.model(h)
    source, target, elsewhere = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (source, target, elsewhere):
        d.mkdir()
    onnx.save(model, source / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    weights_before = (source / "w.bin").read_bytes()
    monkeypatch.chdir(elsewhere)

    result = invoke("minimize", source / "m.onnx", "-o", target / "m.min.onnx", "--external-data")
    assert result.exit_code == 0, result.output
    assert _files(target) == ["m.min.onnx", "m.min.onnx.data"]
    assert (source / "w.bin").read_bytes() == weights_before
    assert _files(elsewhere) == []
    size_in = (source / "m.onnx").stat().st_size + (source / "w.bin").stat().st_size
    size_out = sum((target / name).stat().st_size for name in _files(target))
    assert size_out < size_in
    assert_same_outputs(onnx.load(source / "m.onnx"), onnx.load(target / "m.min.onnx"))


def test_user_inputs_are_checked(tmp_path, model, model_path):
    feeds = seeded_feeds(model, 5)
    np.savez(tmp_path / "inputs.npz", **feeds)
    result = invoke("minimize", model_path, "-o", tmp_path / "out.onnx", "--inputs", tmp_path / "inputs.npz",
                    "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "inputs.npz") in json.loads((tmp_path / "r.json").read_text())["verification_inputs"]


def test_inputs_with_wrong_names(tmp_path, model_path):
    np.savez(tmp_path / "inputs.npz", pixels=np.zeros((2, 6), np.float32))
    result = invoke("minimize", model_path, "-o", tmp_path / "out.onnx", "--inputs", tmp_path / "inputs.npz")
    assert result.exit_code == 2
    assert "missing ['x'], unexpected ['pixels']" in _error_line(result)
    assert not (tmp_path / "out.onnx").exists()


def test_failed_verification_writes_nothing(tmp_path, model_path):
    # NaN inputs make the original output NaN, which verification never accepts.
    np.savez(tmp_path / "nan.npz", x=np.full((2, 6), np.nan, np.float32))
    before = _files(tmp_path)
    result = invoke("minimize", model_path, "-o", tmp_path / "out.onnx", "--inputs", tmp_path / "nan.npz")
    assert result.exit_code == 3
    line = _error_line(result)
    assert "verification failed" in line
    assert "nothing was written" in line
    assert _files(tmp_path) == before


def test_force_writes_but_fails(tmp_path, model_path):
    np.savez(tmp_path / "nan.npz", x=np.full((2, 6), np.nan, np.float32))
    result = invoke("minimize", model_path, "-o", tmp_path / "out.onnx", "--inputs", tmp_path / "nan.npz", "--force")
    assert result.exit_code == 3
    assert (tmp_path / "out.onnx").exists()


def test_no_verify(tmp_path, model_path):
    result = invoke("minimize", model_path, "-o", tmp_path / "out.onnx", "--no-verify")
    assert result.exit_code == 0
    assert "verification: skipped" in result.output


def test_missing_file(tmp_path):
    result = invoke("minimize", tmp_path / "nope.onnx", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    assert "file not found" in _error_line(result)


def test_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 10)
    result = invoke("minimize", path, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    assert "not a valid ONNX model" in _error_line(result)
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_file(tmp_path, model_path):
    data = model_path.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    result = invoke("minimize", truncated, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    assert "truncated" in _error_line(result)


def test_missing_external_data(tmp_path, model):
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    (tmp_path / "w.bin").unlink()
    result = invoke("minimize", tmp_path / "m.onnx", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    assert "external data file 'w.bin'" in _error_line(result)


def test_model_rejected_by_checker(tmp_path, model):
    model.graph.node[0].input[0] = "undefined_tensor"
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    result = invoke("minimize", path, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    assert "rejected by onnx.checker" in _error_line(result)


def test_output_directory_missing(tmp_path, model_path):
    result = invoke("minimize", model_path, "-o", tmp_path / "missing" / "out.onnx")
    assert result.exit_code == 2
    assert "does not exist" in _error_line(result)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to read-only directories")
def test_output_directory_read_only(tmp_path, model_path):
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
    result = invoke("minimize", model_path, "-o", target / "out.onnx")
    assert result.exit_code == 2
    assert "not writable" in _error_line(result)


def test_output_is_a_directory(tmp_path, model_path):
    result = invoke("minimize", model_path, "-o", tmp_path)
    assert result.exit_code == 2
    assert "is a directory" in _error_line(result)


def test_output_equal_to_input(tmp_path, model_path):
    before = model_path.read_bytes()
    result = invoke("minimize", model_path, "-o", model_path)
    assert result.exit_code == 2
    assert "the -o path is the input model" in _error_line(result)
    assert model_path.read_bytes() == before


def test_bad_batch_option(tmp_path, model_path):
    result = invoke("minimize", model_path, "-o", tmp_path / "out.onnx", "--batch", "two")
    assert result.exit_code == 2
    assert "comma-separated list of integers" in result.output


def test_console_script_runs(tmp_path, model_path):
    executable = shutil.which("onnx-squeeze", path=os.path.dirname(sys.executable))
    assert executable, "the onnx-squeeze console script is not installed"
    completed = subprocess.run([executable, "minimize", str(model_path), "-o", str(tmp_path / "o.onnx")],
                               capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr


def test_report_path_equal_to_input(tmp_path, model_path):
    before = model_path.read_bytes()
    result = invoke("minimize", model_path, "-o", tmp_path / "out.onnx", "--report", model_path)
    assert result.exit_code == 2
    assert "the --report path is the input model" in _error_line(result)
    assert model_path.read_bytes() == before
    assert not (tmp_path / "out.onnx").exists()


def test_report_path_equal_to_output(tmp_path, model_path):
    result = invoke("minimize", model_path, "-o", tmp_path / "out.onnx", "--report", tmp_path / "out.onnx")
    assert result.exit_code == 2
    assert "the --report path is the -o path" in _error_line(result)


def test_report_in_missing_directory_writes_nothing(tmp_path, model_path):
    before = _files(tmp_path)
    result = invoke("minimize", model_path, "-o", tmp_path / "out.onnx", "--report", tmp_path / "nodir" / "r.json")
    assert result.exit_code == 2
    assert "does not exist" in _error_line(result)
    assert _files(tmp_path) == before


def test_output_onto_input_external_data(tmp_path, model):
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    data_before = (tmp_path / "ext.onnx.data").read_bytes()
    result = invoke("minimize", tmp_path / "ext.onnx", "-o", tmp_path / "ext.onnx.data")
    assert result.exit_code == 2
    assert "external data file" in _error_line(result)
    assert (tmp_path / "ext.onnx.data").read_bytes() == data_before


def test_external_data_twice_in_output_directory(tmp_path, model_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        result = invoke("minimize", model_path, "-o", "m.onnx", "--external-data")
        assert result.exit_code == 0, result.output
    assert_same_outputs(onnx.load(model_path), onnx.load(tmp_path / "m.onnx"))


def test_inputs_npy_file(tmp_path, model_path):
    np.save(tmp_path / "in.npy", np.zeros((2, 6), np.float32))
    result = invoke("minimize", model_path, "-o", tmp_path / "out.onnx", "--inputs", tmp_path / "in.npy")
    assert result.exit_code == 2
    assert "not an .npz archive" in _error_line(result)


def test_model_rejected_by_onnxruntime(tmp_path, model):
    # The ONNX checker accepts duplicate node names; onnxruntime does not load such a model.
    for node in model.graph.node:
        node.name = "same"
    path = tmp_path / "dup.onnx"
    onnx.save(model, path)
    result = invoke("minimize", path, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    assert "onnxruntime cannot load the input model" in _error_line(result)
    assert not (tmp_path / "out.onnx").exists()


def test_models_over_protobuf_limit_go_through_files(tmp_path, monkeypatch):
    # Pretend the 2 GiB protobuf limit is 1 kB: checking, verifying and saving must then
    # use files with external data, as they do for real models over 2 GiB.
    import onnx_squeeze.io
    import onnx_squeeze.verify

    monkeypatch.setattr(onnx_squeeze.io, "PROTOBUF_LIMIT_BYTES", 1000)
    monkeypatch.setattr(onnx_squeeze.verify, "PROTOBUF_LIMIT_BYTES", 1000)
    rng = np.random.default_rng(3)
    b = GraphBuilder(input_shape=("N", 32))
    w1, b1 = weights(rng, 32, 32)
    w1[:, :8] = 0.0
    w2, b2 = weights(rng, 32, 4)
    model = b.model(b.gemm(b.op("Relu", [b.gemm("x", w1, b1)]), w2, b2))
    assert model.ByteSize() > 1000
    onnx.save(model, tmp_path / "big.onnx", save_as_external_data=True, location="big.bin", size_threshold=0)

    result = invoke("minimize", tmp_path / "big.onnx", "-o", tmp_path / "small.onnx")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "small.onnx.data").exists()
    assert_same_outputs(onnx.load(tmp_path / "big.onnx"), onnx.load(tmp_path / "small.onnx"))


def test_dim_option_sets_named_dims(tmp_path):
    # An unpadded conv of width 5 cannot run at width 1 or 3, so the default sizes fail,
    # and --dim sets the width while the batch takes the --batch sizes.
    rng = np.random.default_rng(4)
    b = GraphBuilder(input_shape=("N", 2, "width"))
    w = rng.uniform(-1, 1, (4, 2, 5)).astype(np.float32)
    w[1] = 0.0
    h = b.op("Relu", [b.op("Conv", ["x", b.const(w), b.const(np.full(4, 0.5, np.float32))], kernel_shape=[5])])
    w2 = rng.uniform(-1, 1, (3, 4, 1)).astype(np.float32)
    path = tmp_path / "conv1d.onnx"
    onnx.save(b.model(b.op("Conv", [h, b.const(w2)], kernel_shape=[1])), path)

    failing = invoke("minimize", path, "-o", tmp_path / "out.onnx")
    assert failing.exit_code == 2
    assert "--dim NAME=SIZE" in _error_line(failing)

    result = invoke("minimize", path, "-o", tmp_path / "out.onnx", "--dim", "width=16", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    cases = json.loads((tmp_path / "r.json").read_text())["verification_inputs"]
    assert all("width = 16" in case for case in cases)


def test_dim_option_rejects_bad_value(tmp_path, model_path):
    result = invoke("minimize", model_path, "-o", tmp_path / "out.onnx", "--dim", "width")
    assert result.exit_code == 2
    assert "NAME=SIZE" in result.output
