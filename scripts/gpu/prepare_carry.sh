#!/usr/bin/env bash
# Prepare what a GPU machine needs besides the repo checkout, in the ignored folder .carry/:
#   .carry/Megatron-LM   the patched tree's files (git archive of build/Megatron-LM HEAD)
#   .carry/wheels        mamba_ssm / causal_conv1d wheels (from ../shared/wheels or $WHEELS_DIR)
# Then run scripts/gpu/run_gpu_tests.sh there (the device tool carries .carry).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
make -s apply-patches
rm -rf .carry/Megatron-LM && mkdir -p .carry/Megatron-LM .carry/wheels
git -C build/Megatron-LM archive HEAD megatron tools pretrain_gpt.py pretrain_hybrid.py \
    pretrain_mamba.py gpt_builders.py hybrid_builders.py mamba_builders.py model_provider.py \
    | tar -x -C .carry/Megatron-LM
# Megatron's compiled dataset helpers (built by `make dataset-helpers`), if present.
cp build/Megatron-LM/megatron/core/datasets/helpers_cpp*.so .carry/Megatron-LM/megatron/core/datasets/ 2>/dev/null || true
wheels=${WHEELS_DIR:-../shared/wheels}
if [ -d "$wheels" ]; then cp "$wheels"/*.whl .carry/wheels/; fi
du -sh .carry/Megatron-LM .carry/wheels
