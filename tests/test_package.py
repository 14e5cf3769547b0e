"""Package-level properties: the minimizer imports no torch."""

from __future__ import annotations

import subprocess
import sys


def test_minimizer_does_not_import_torch():
    code = (
        "import sys, onnx_squeeze, onnx_squeeze.cli, onnx_squeeze.api; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
