#!/usr/bin/env bash
# Set up .venv and train the offline digits quickstart into runs/digits (2-7 minutes on 2 AVX-512
# CPU cores, about 10 on 2 AVX2 ones). Re-running starts that run afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -d runs/digits/checkpoints ]; then
  exec .venv/bin/ddim train configs/digits.yaml --overwrite "$@"
fi
exec .venv/bin/ddim train configs/digits.yaml "$@"
