#!/usr/bin/env bash
# The GPU job (self-hosted H100 runner): set up, build the patched tree, run the GPU tier.
# Results (JSON + logs) go to $1 (default gpu-results/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
make setup apply-patches
source .venv/bin/activate
bash scripts/gpu/run_gpu_tests.sh "${1:-gpu-results}"
