#!/usr/bin/env bash
# Create .venv (if missing) and install onnx_squeeze with its training and test extras.
# torch is pinned by constraints.txt: the CPU build of 2.13.0 installs from a local file,
# while an unpinned torch would pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[train,test]"
