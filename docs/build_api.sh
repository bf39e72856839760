#!/usr/bin/env bash
# API reference from the docstrings: docs/api/index.html (not committed; `pip install -e ".[docs]"`).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pdoc -d google -o docs/api energy_jax
echo "wrote docs/api/index.html"
