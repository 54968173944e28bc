#!/usr/bin/env bash
# Set up .venv and run the linter and the whole test suite (CPU only, no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
