#!/usr/bin/env bash
# Set up .venv and train the offline digits quickstart into runs/digits (2-6 minutes on 2 CPU
# cores). Re-running starts that run afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -d runs/digits/checkpoints ]; then
  exec .venv/bin/ddim train configs/digits.yaml --overwrite "$@"
fi
exec .venv/bin/ddim train configs/digits.yaml "$@"
