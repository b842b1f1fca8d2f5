#!/usr/bin/env bash
# Convert Falcon-H1 checkpoints between HF transformers and Megatron (any TP/PP, exact):
#   scripts/convert_falcon_h1.sh hf-to-megatron --hf-dir HF --save-dir CKPT \
#       --target-tp N --target-pp M [--ckpt-format torch_dist|torch] [--force]
#   scripts/convert_falcon_h1.sh megatron-to-hf --load-dir CKPT --save-dir HF \
#       [--dtype bf16|fp32] [--force]
# Runs tools/checkpoint/falcon_h1_conversion.py of the patched tree (build/Megatron-LM, made by
# `make apply-patches`; $FALCON_MCORE_BUILD overrides it) with that tree on PYTHONPATH.
# `scripts/convert_falcon_h1.sh hf-to-megatron --help` lists every option.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/build_tool.sh"
run_build_tool tools/checkpoint/falcon_h1_conversion.py "$@"
