#!/usr/bin/env bash
# The multi-GPU job (issue 15) on a machine with NUM_GPUS GPUs, after scripts/gpu/prepare_carry.sh
# here:
#   bash scripts/gpu/multi_gpu.sh NUM_GPUS OUT_DIR [--dry-run] [multi_gpu.py options...]
# NUM_GPUS: 1, 2, 4 or 8. Steps (--steps parity,functional,scaling; all by default): NCCL parity
# of the fine-tuning layouts of tests/falcon_h1/test_tp_training.py (+ BitNet, TP=8), the
# functional cases on CUDA (--record writes golden_values_h200_x{N}.json), data-parallel scaling
# of the Falcon-H1-0.5B training step. --dry-run prints every command and needs no GPU.
# Results: OUT_DIR/multi_gpu_x{N}.json and .md, logs_x{N}.tar.gz (scripts/gpu/multi_gpu.py).
# One device call runs at most 10 minutes: give each call one step (and --deadline-s).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
usage="usage: bash scripts/gpu/multi_gpu.sh NUM_GPUS OUT_DIR [--dry-run] [multi_gpu.py options]"
if [ $# -lt 2 ]; then echo "$usage" >&2; exit 2; fi
gpus=$1 out=$2
shift 2
case $gpus in
    1|2|4|8) ;;
    *) echo "multi_gpu.sh: NUM_GPUS must be 1, 2, 4 or 8 (got '$gpus')" >&2
       echo "$usage" >&2; exit 2 ;;
esac
dry=0
for arg in "$@"; do if [ "$arg" = --dry-run ]; then dry=1; fi; done
if [ $dry = 1 ]; then
    echo "# would: source scripts/gpu/setup_env.sh --te"
    MEGATRON=${MEGATRON:-$PWD/build/Megatron-LM}
else
    source scripts/gpu/setup_env.sh --te
fi
# NVLink multicast off (device KINDS.md). setup_env.sh --te exports these only when it unpacks
# the Transformer Engine kit; here they hold for every run, with or without it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 scripts/gpu/multi_gpu.py --num-gpus "$gpus" --out-dir "$out" --megatron "$MEGATRON" "$@"
