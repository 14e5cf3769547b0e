#!/usr/bin/env bash
# Install the project into .venv and run the test suite (slow tests are deselected).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
.venv/bin/python -m pytest -q "$@"
