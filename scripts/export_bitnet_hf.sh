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
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${FALCON_MCORE_BUILD:-$root/build/Megatron-LM}"
tool="$build/tools/checkpoint/bitnet_hf_export.py"
if [ ! -f "$tool" ]; then
    echo "error: $tool not found: run \`make apply-patches\` (or set FALCON_MCORE_BUILD)" >&2
    exit 2
fi
python="${PYTHON:-}"
if [ -z "$python" ]; then
    python=python3
    [ -x "$root/.venv/bin/python" ] && python="$root/.venv/bin/python"
fi
export PYTHONPATH="$build${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$tool" "$@"
