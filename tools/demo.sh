#!/usr/bin/env bash
# Minimize the bundled pruned LeNet-300-100 and print the before/after table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
mkdir -p out
.venv/bin/onnx-squeeze minimize models/lenet300_mnist_pruned.onnx \
    -o out/lenet300_mnist_min.onnx --prune-inputs --report out/lenet300_report.json "$@"
