"""onnx_squeeze: exact structural minimization of element-wise-pruned ONNX models.

``minimize(model)`` returns a smaller dense model that computes the same outputs, checked in
onnxruntime; ``minimize_file(path, out)`` also loads, writes and reports. The minimizer does
not import torch.
"""

__version__ = "0.1.0"

from .api import MinimizeResult, load_inputs, minimize, minimize_file  # noqa: E402
from .errors import (  # noqa: E402
    InputsError,
    ModelLoadError,
    OutputError,
    SqueezeError,
    UnsupportedModelError,
    VerificationError,
)

__all__ = [
    "InputsError",
    "MinimizeResult",
    "ModelLoadError",
    "OutputError",
    "SqueezeError",
    "UnsupportedModelError",
    "VerificationError",
    "__version__",
    "load_inputs",
    "minimize",
    "minimize_file",
]
