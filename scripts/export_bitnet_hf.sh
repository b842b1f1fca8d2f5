#!/usr/bin/env bash
# Export a Megatron BitNet b1.58 checkpoint (trained with --use-bitnet) to HF transformers:
#   scripts/export_bitnet_hf.sh --load-dir CKPT --save-dir OUT [--model auto|gpt|falcon-h1] \
#       [--format bitnet|dense] [--dtype auto|bf16|fp32] \
#       [--linear-class bitlinear|autobitlinear] [--vocab-size N] [--force]
# GPT becomes LlamaForCausalLM, Falcon-H1 FalconH1ForCausalLM; --format bitnet writes
# transformers' `bitnet` quantization (packed ternary weights + weight_scale), --format dense the
# plain model with weights beta*T. Runs tools/checkpoint/bitnet_hf_export.py of the patched tree
# (build/Megatron-LM, made by `make apply-patches`; $FALCON_MCORE_BUILD overrides it) with that
# tree on PYTHONPATH. `scripts/export_bitnet_hf.sh --help` lists every option.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/build_tool.sh"
run_build_tool tools/checkpoint/bitnet_hf_export.py "$@"
