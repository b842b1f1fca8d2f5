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
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${FALCON_MCORE_BUILD:-$root/build/Megatron-LM}"
tool="$build/tools/checkpoint/falcon_h1_conversion.py"
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
