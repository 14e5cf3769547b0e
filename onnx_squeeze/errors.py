"""Exceptions raised for problems with the user's input.

The CLI turns every ``SqueezeError`` into one line on stderr and a non-zero exit status.
Internal invariants use ``assert`` instead, so a failed assert is a bug in onnx_squeeze.
"""


class SqueezeError(Exception):
    """Base class of the errors that onnx_squeeze reports to the user."""

    exit_code = 1


class ModelLoadError(SqueezeError):
    """The input model is missing, unreadable, truncated or rejected by the ONNX checker."""

    exit_code = 2


class UnsupportedModelError(SqueezeError):
    """The model is valid ONNX but uses something onnx_squeeze cannot process."""

    exit_code = 2


class OutputError(SqueezeError):
    """The output path is invalid or cannot be written."""

    exit_code = 2


class InputsError(SqueezeError):
    """The user's verification inputs do not match the model's graph inputs."""

    exit_code = 2


class VerificationError(SqueezeError):
    """The minimized model does not reproduce the original outputs within tolerance."""

    exit_code = 3
