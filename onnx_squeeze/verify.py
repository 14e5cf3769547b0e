"""Verification: run the original and the minimized model in onnxruntime and compare outputs.

Both models run on the CPU execution provider with the same session options, on seeded
random inputs at each of the given batch sizes (every symbolic dim takes that size, unless
``dim_sizes`` names it) and on the user's own inputs when given. Every output must match elementwise within
``|minimized - original| <= atol + rtol * |original|``, which is numpy's ``allclose`` rule.

Inputs on which the original model already produces NaN or Inf are not a pass: the masked
model can compute ``0 * inf = NaN`` where the minimized one does not, so the comparison
fails with a message asking for other inputs.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputsError, UnsupportedModelError
from .io import PROTOBUF_LIMIT_BYTES, save_model

logger = logging.getLogger(__name__)

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
# Half-precision outputs carry about 3 significant digits, so removal and folding (which
# change the summation order and round the folded bias) need looser defaults there.
HALF_PRECISION_RTOL = 1e-2
HALF_PRECISION_ATOL = 1e-3
DEFAULT_BATCH_SIZES = (1, 3)
DEFAULT_SEED = 0

# Relative errors are reported only where |original| exceeds this, so that outputs near
# zero do not dominate the figure.
RELATIVE_ERROR_FLOOR = 1e-6

RUNTIME_ERRORS = (
    ort.capi.onnxruntime_pybind11_state.Fail,
    ort.capi.onnxruntime_pybind11_state.InvalidArgument,
    ort.capi.onnxruntime_pybind11_state.InvalidGraph,
    ort.capi.onnxruntime_pybind11_state.NotImplemented,
    ort.capi.onnxruntime_pybind11_state.RuntimeException,
    ort.capi.onnxruntime_pybind11_state.NoSuchFile,
)

_NUMPY_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


@dataclass
class Verification:
    """Outcome of the comparison; ``cases`` names each input set that was run."""

    passed: bool
    max_abs_error: float
    max_rel_error: float
    cases: list[str] = field(default_factory=list)
    message: str = ""

    def as_dict(self) -> dict:
        return {
            "verified": self.passed,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "verification_inputs": self.cases,
            "verification_message": self.message,
        }


def _session(model: onnx.ModelProto, tmp_dir: Path, label: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # Failures come back as exceptions with the same text, so the runtime's own log stays quiet.
    options.log_severity_level = 4
    if model.ByteSize() < PROTOBUF_LIMIT_BYTES:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    path = tmp_dir / f"{label}.onnx"
    save_model(model, path, external_data=True)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def random_inputs(
    model: onnx.ModelProto, batch: int, rng: np.random.Generator, dim_sizes: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input.

    A symbolic dim named in ``dim_sizes`` takes that size; every other symbolic or unknown
    dim takes ``batch``.
    """
    dim_sizes = dim_sizes or {}
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = _NUMPY_TYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise InputsError(
                f"graph input '{value.name}' has element type "
                f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)}, which the random-input "
                "generator does not support; pass your own inputs with --inputs FILE.npz"
            )
        shape = [
            d.dim_value if d.HasField("dim_value") else dim_sizes.get(d.dim_param, batch)
            for d in tensor_type.shape.dim
        ]
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        else:
            feeds[value.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def check_user_inputs(model: onnx.ModelProto, inputs: dict[str, np.ndarray], source: str) -> None:
    initializers = {t.name for t in model.graph.initializer}
    expected = [v.name for v in model.graph.input if v.name not in initializers]
    missing = [name for name in expected if name not in inputs]
    extra = [name for name in inputs if name not in expected]
    if missing or extra:
        raise InputsError(
            f"{source}: arrays must be named after the graph inputs {expected}; "
            f"missing {missing}, unexpected {extra}"
        )


def verify(
    original: onnx.ModelProto,
    minimized: onnx.ModelProto,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    inputs: dict[str, np.ndarray] | None = None,
    inputs_source: str = "inputs",
    seed: int = DEFAULT_SEED,
    dim_sizes: dict[str, int] | None = None,
) -> Verification:
    """Compare every output of the two models on every input set.

    ``rtol`` and ``atol`` default per output dtype: 1e-4 and 1e-5, or 1e-2 and 1e-3 for
    float16 and bfloat16 outputs.
    """
    rng = np.random.default_rng(seed)
    cases: list[tuple[str, dict[str, np.ndarray]]] = []
    fixed = ", ".join(f"{name} = {size}" for name, size in sorted((dim_sizes or {}).items()))
    for batch in batch_sizes:
        label = f"random (seed {seed}), dynamic dims = {batch}" + (f", {fixed}" if fixed else "")
        cases.append((label, random_inputs(original, batch, rng, dim_sizes)))
    if inputs is not None:
        check_user_inputs(original, inputs, inputs_source)
        cases.append((inputs_source, inputs))

    result = Verification(passed=True, max_abs_error=0.0, max_rel_error=0.0)
    with tempfile.TemporaryDirectory(prefix="onnx_squeeze-verify-") as tmp:
        try:
            reference = _session(original, Path(tmp), "original")
        except RUNTIME_ERRORS as exc:
            raise UnsupportedModelError(
                f"onnxruntime cannot load the input model ({first_line(exc)}); the model cannot be "
                "verified, so it is not minimized"
            ) from exc
        try:
            candidate = _session(minimized, Path(tmp), "minimized")
        except RUNTIME_ERRORS as exc:
            _fail(result, f"onnxruntime cannot load the minimized model ({first_line(exc)})")
            return result

        output_names = [o.name for o in original.graph.output]
        for label, feeds in cases:
            result.cases.append(label)
            try:
                expected = reference.run(output_names, feeds)
            except RUNTIME_ERRORS as exc:
                raise InputsError(
                    f"{label}: the original model failed to run on these inputs ({first_line(exc)}); "
                    "pass --batch and --dim NAME=SIZE with sizes valid for the model, or your own "
                    "inputs with --inputs"
                ) from exc
            try:
                actual = candidate.run(output_names, feeds)
            except RUNTIME_ERRORS as exc:
                _fail(result, f"{label}: the minimized model failed to run ({first_line(exc)})")
                continue
            _compare(result, label, output_names, expected, actual, rtol, atol)
    return result


def first_line(exc: Exception) -> str:
    """Return the first non-empty line of an exception's message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def default_tolerances(dtype: np.dtype) -> tuple[float, float]:
    """Return the (rtol, atol) used for outputs of ``dtype`` when none are given."""
    if dtype == np.float16 or dtype.name == "bfloat16":
        return HALF_PRECISION_RTOL, HALF_PRECISION_ATOL
    return DEFAULT_RTOL, DEFAULT_ATOL


def _compare(result: Verification, label: str, names, expected, actual, rtol, atol) -> None:
    for name, want, got in zip(names, expected, actual):
        want, got = np.asarray(want), np.asarray(got)
        default_rtol, default_atol = default_tolerances(want.dtype)
        output_rtol = default_rtol if rtol is None else rtol
        output_atol = default_atol if atol is None else atol
        if want.shape != got.shape:
            _fail(result, f"{label}: output '{name}' has shape {list(got.shape)}, expected {list(want.shape)}")
            continue
        if want.dtype.kind not in "fc":
            if not np.array_equal(want, got):
                _fail(result, f"{label}: output '{name}' differs")
            continue
        if not np.isfinite(want).all():
            _fail(
                result,
                f"{label}: the original model outputs NaN or Inf in '{name}', so the outputs "
                "cannot be compared; pass finite-valued inputs with --inputs",
            )
            continue
        want64, got64 = want.astype(np.float64), got.astype(np.float64)
        error = np.abs(got64 - want64)
        error = np.where(np.isfinite(got64), error, np.inf)
        if error.size:
            result.max_abs_error = max(result.max_abs_error, float(error.max()))
            scale = np.abs(want64)
            relevant = scale > RELATIVE_ERROR_FLOOR
            if relevant.any():
                result.max_rel_error = max(result.max_rel_error, float((error[relevant] / scale[relevant]).max()))
        if not (error <= output_atol + output_rtol * np.abs(want64)).all():
            _fail(
                result,
                f"{label}: output '{name}' differs by up to {float(error.max()):.3g} "
                f"(atol {output_atol}, rtol {output_rtol})",
            )


def _fail(result: Verification, message: str) -> None:
    logger.debug("verification: %s", message)
    result.passed = False
    if not result.message:
        result.message = message
