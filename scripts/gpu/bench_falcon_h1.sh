#!/usr/bin/env bash
# The Falcon-H1 throughput benchmark on a GPU machine (after scripts/gpu/prepare_carry.sh here):
#   bash scripts/gpu/bench_falcon_h1.sh OUT_DIR [bench_falcon_h1.py arguments...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${1:?usage: bench_falcon_h1.sh OUT_DIR [arguments]}
shift
source scripts/gpu/setup_env.sh --te
python3 scripts/gpu/bench_falcon_h1.py --out-dir "$out" --megatron "$MEGATRON" "$@"
