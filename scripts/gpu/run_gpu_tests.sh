#!/usr/bin/env bash
# The GPU tier: run on a CUDA machine from a repo checkout (after scripts/gpu/prepare_carry.sh,
# or with the patched tree at build/Megatron-LM). Writes JSON/markdown results to $1
# (default: $OUT, else gpu-results/). Steps can be chosen: run_gpu_tests.sh DIR mamba parity ...
#   mamba     pure-PyTorch Mamba-2 ops vs mamba_ssm / causal_conv1d kernels
#   parity    Megatron Falcon-H1 vs HF FalconH1ForCausalLM (fp32 + bf16, kernels)
#   bitnet    BitNet kernel correctness
#   bench     BitNet benchmark (bf16 vs ours vs PR #3002 method)
#   convert   Falcon-H1 HF -> Megatron -> HF on a 0.5B-shaped random model, bf16 logits
#   gptstep   whole BitNet GPT training step vs bf16 (pretrain_gpt.py), peak memory
#   gptaccum  the same with 4 micro-batches per step (gradient accumulation)
#   h1step    BitNet vs bf16 training step of a Falcon-H1-0.5B-shaped model (pretrain_mamba.py)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
results=${1:-${OUT:-gpu-results}}
shift || true
steps=${*:-mamba parity bitnet bench convert gptstep gptaccum h1step}
mkdir -p "$results"
megatron=build/Megatron-LM
[ -d .carry/Megatron-LM/megatron ] && megatron=.carry/Megatron-LM
if ls .carry/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/$megatron${PYTHONPATH:+:$PYTHONPATH}
export USE_HUB_KERNELS=NO HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1  # no network on GPU runners
python3 - <<'PY' > "$results/environment.json"
import json, subprocess, sys, datetime, torch
print(json.dumps({
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
    "nvidia_smi": subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip(),
}, indent=2))
PY
status=0
run() {  # name, command...
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$SECONDS
    if timeout "${STEP_TIMEOUT:-300}" "$@" > "$results/$name.log" 2>&1; then echo "--- $name passed ($((SECONDS - t0)) s)";
    else echo "--- $name FAILED ($((SECONDS - t0)) s)"; tail -30 "$results/$name.log"; status=1; fi
}
for step in $steps; do
    case $step in
        mamba) run mamba python3 scripts/gpu/check_mamba2_torch.py --out "$results/mamba2_torch_vs_kernels.json" ;;
        parity) run parity python3 scripts/gpu/check_falcon_h1_hf_parity.py --megatron "$megatron" --out "$results/falcon_h1_hf_parity.json" ;;
        bitnet) run bitnet python3 scripts/gpu/test_bitnet_kernels.py --out "$results/bitnet_kernels.json" ;;
        bench) run bench python3 scripts/bench_bitnet.py --out-dir "$results" ;;
        gptstep) run gptstep python3 scripts/gpu/bench_bitnet_gpt_step.py --megatron "$megatron" --out-dir "$results" --iters "${GPT_STEP_ITERS:-30}" ;;
        gptaccum) run gptaccum python3 scripts/gpu/bench_bitnet_gpt_step.py --megatron "$megatron" --out-dir "$results" --iters "${GPT_STEP_ITERS:-30}" --micro-batches 4 --variants bitnet,bitnet_dgrad_cached ;;
        h1step) run h1step python3 scripts/gpu/bench_bitnet_gpt_step.py --megatron "$megatron" --out-dir "$results" --iters "${GPT_STEP_ITERS:-30}" --model falcon_h1_0.5b --variants bitnet ;;
        convert) run convert python3 scripts/gpu/check_falcon_h1_conversion.py --out "$results/falcon_h1_conversion.json" ;;
        *) echo "unknown step $step"; status=1 ;;
    esac
done
exit $status
