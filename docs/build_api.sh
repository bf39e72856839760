#!/usr/bin/env bash
# API reference from the docstrings: docs/api/index.html (not committed; `pip install -e ".[docs]"`).
set -euo pipefail
cd "$(dirname "$0")/.."
modules=$(ls energy_jax/*.py | grep -v __init__ | sed 's|/|.|; s|\.py$||')
python -m pdoc -d google -o docs/api energy_jax $modules
echo "wrote docs/api/index.html"
