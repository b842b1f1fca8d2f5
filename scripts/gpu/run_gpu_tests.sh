#!/usr/bin/env bash
# The GPU tier: run on a CUDA machine from a repo checkout (after scripts/gpu/prepare_carry.sh
# here, whose .carry/ scripts/gpu/setup_env.sh unpacks there; or with build/Megatron-LM).
# Writes JSON/markdown results to $1 (default: $OUT, else gpu-results/). Steps can be chosen:
# run_gpu_tests.sh DIR mamba parity ...
#   mamba     pure-PyTorch Mamba-2 ops and mamba_ssm / causal_conv1d kernels vs a naive reference
#             (MAMBA_ARGS: extra arguments, e.g. "--dtypes float32 --no-timing" to split it over
#             device calls: all of it took more than 230 s on a warm H200)
#   parity    Megatron Falcon-H1 vs HF FalconH1ForCausalLM (fp32 + bf16, kernels)
#   parity_te the same with Megatron's Transformer Engine Falcon-H1 spec (needs TE=1)
#             (PARITY_ARGS: extra arguments of both parity steps, e.g. "--cases g1_norm0_memeff")
#   bitnet    BitNet kernel correctness
#   unit      overlay unit tests on the GPU (compiled Triton kernels, `gpu`-marked tests), by
#             scripts/gpu/run_gpu_unit_tests.py (UNIT_TESTS: test paths, default its DEFAULT_TESTS:
#             the BitNet kernels, the graphed-step synchronisation, the Triton fusions, the
#             parameter copy and batch-first layout swap)
#   bench     BitNet benchmark (bf16 vs ours vs PR #3002 method)
#   convert   Falcon-H1 HF -> Megatron -> HF on a 0.5B-shaped random model, bf16 logits
#   gptstep   whole BitNet GPT training step vs bf16 (pretrain_gpt.py), peak memory
#   gptaccum  the same with 4 micro-batches per step (gradient accumulation)
#   h1step    BitNet vs bf16 training step of a Falcon-H1-0.5B-shaped model (pretrain_mamba.py)
#   sdpa      causal GQA attention fwd+bwd per PyTorch SDPA backend at Falcon-H1's shapes, with
#             errors against an fp32 reference (scripts/gpu/bench_sdpa.py; the local spec's kernel)
#   layout    the batch-first Mamba layer's layout changes fwd+bwd: transpose().contiguous() vs
#             swap_leading_dims (rows as 8-byte words, contiguous gradients), graph replays, bit
#             equality checked; and the multiplier fold into weights: PyTorch vs the Triton row
#             scale; main_grad.add_ vs the Triton accumulation (scripts/gpu/bench_layout_swap.py)
#   adam      one AdamW step over the 0.5B model's fp32 parameters: TE's FusedAdam vs PyTorch's
#             fused / foreach AdamW, graph replays (scripts/gpu/bench_adam.py; TE=1 for TE's)
#   ce        the language-model loss alone: Megatron's unfused / fused-native cross entropy,
#             ours in Triton (--cross-entropy-fusion-impl triton) and TE's, fwd+bwd on bf16 logits
#             at Falcon-H1 vocabularies, graph replays + eager, peak memory, float64 errors
#             (scripts/gpu/bench_cross_entropy.py; TE=1 for TE's)
#   fusion    the parallel-hybrid projection fusion (QKV + in_proj in one GEMM, both output
#             projections in one) vs separate GEMMs, fwd+bwd as graph replays
#             (scripts/gpu/bench_hybrid_fusion.py)
#   resume    resume a Falcon-H1 launcher run across Adam implementations (TE FusedAdam <->
#             PyTorch fused AdamW) and compare the losses with uninterrupted runs
#             (scripts/gpu/check_adam_resume.py; needs TE=1)
#   falconh1  Falcon-H1 training step, HF transformers vs ours (scripts/gpu/bench_falcon_h1.py;
#             TE=1 unpacks the carried Transformer Engine kit for its TE runs). Not in the
#             default list: it needs more than one device call (use its --deadline-s/--resume)
#             FALCON_H1_BENCH_ARGS: its arguments; FALCON_H1_NAME: the results file stem
# MAMBA_SHARDS / PARITY_SHARDS ("case,case;case,..."): run the mamba / parity(_te) step as parallel
# processes over these case subsets (scripts/gpu/run_shards.py): a cold Triton cache otherwise
# spends the step compiling autotuned kernels one at a time (the 8-case fp32-IEEE parity step
# had not finished its first case after 290 s on an H200).
# Multi-GPU runs (NCCL parity, functional goldens on N GPUs, DP scaling) are a job of their own:
#   bash scripts/gpu/multi_gpu.sh NUM_GPUS OUT_DIR [--dry-run]
#
# Green or named: the exit status is 0 only if every step exited 0 (a check script exits 0 only
# when its checks passed or failed in a declared, named way: see its report). Every step's
# status, time and pass/fail counts (from its report's "summary") go to DIR/summary.json, with
# the provenance (commit, dirty tree, versions) that every report also carries
# (scripts/lib/provenance.py; DIR/environment.json is the same record for the job).
# Time limit per step: STEP_TIMEOUT (default 300 s), or STEP_TIMEOUT_<step> for one step. The
# mamba step's own default is 1200 s: on a warm H200 its fp32 half alone ran past 240 s
# (results/h200/falcon_h1/logs/), so 300 s could only ever end it red.
set -uo pipefail
: "${STEP_TIMEOUT_mamba:=1200}"
# The resume step's 12 launcher runs took 390-462 s on an H200 (results/h200/optimizer/).
: "${STEP_TIMEOUT_resume:=560}"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
results=${1:-${OUT:-gpu-results}}
shift || true
steps=${*:-mamba parity bitnet bench convert gptstep gptaccum h1step}
mkdir -p "$results"
# The carried patched tree (else build/Megatron-LM) and wheels; no network on GPU runners.
if [ "${TE:-0}" = 1 ]; then source scripts/gpu/setup_env.sh --te
else source scripts/gpu/setup_env.sh ""; fi  # "": not --te (and not this script's arguments)
megatron=$MEGATRON
export PYTHONPATH=$megatron${PYTHONPATH:+:$PYTHONPATH}
status=0
if ! python3 scripts/lib/provenance.py --out "$results/environment.json" -- \
        scripts/gpu/run_gpu_tests.sh "$results" $steps; then
    echo "--- environment.json FAILED"; status=1
fi
steps_tsv="$results/steps.tsv"
: > "$steps_tsv"
run() {  # name, report (JSON the step writes, or -), command...
    local name=$1 report=$2; shift 2
    echo "=== $name: $*"
    local t0=$SECONDS rc limit_var="STEP_TIMEOUT_$name"
    timeout "${!limit_var:-${STEP_TIMEOUT:-300}}" "$@" > "$results/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then echo "--- $name passed ($((SECONDS - t0)) s)"
    else
        [ $rc -eq 124 ] && echo "--- $name TIMED OUT" || echo "--- $name FAILED (exit $rc)"
        tail -30 "$results/$name.log"; status=1
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$report" >> "$steps_tsv"
}
for step in $steps; do
    case $step in
        mamba) if [ -n "${MAMBA_SHARDS:-}" ]; then
                   run mamba "$results/mamba2_torch_vs_kernels.json" python3 scripts/gpu/run_shards.py --shards "$MAMBA_SHARDS" --out "$results/mamba2_torch_vs_kernels.json" \
                       -- python3 scripts/gpu/check_mamba2_torch.py ${MAMBA_ARGS:-}
               else run mamba "$results/mamba2_torch_vs_kernels.json" python3 scripts/gpu/check_mamba2_torch.py ${MAMBA_ARGS:-} --out "$results/mamba2_torch_vs_kernels.json"; fi ;;
        parity|parity_te)
                report="$results/falcon_h1_hf_$step.json"  # falcon_h1_hf_parity[_te].json
                parity_cmd=(python3 scripts/gpu/check_falcon_h1_hf_parity.py --megatron "$megatron" ${PARITY_ARGS:-})
                [ "$step" = parity_te ] && parity_cmd+=(--transformer-impl transformer_engine)
                limit_var="STEP_TIMEOUT_$step"
                parity_cmd+=(--timeout $(( ${!limit_var:-${STEP_TIMEOUT:-300}} - 10 )))  # traceback before the kill
                if [ -n "${PARITY_SHARDS:-}" ]; then
                    run "$step" "$report" python3 scripts/gpu/run_shards.py --shards "$PARITY_SHARDS" --out "$report" -- "${parity_cmd[@]}"
                else run "$step" "$report" "${parity_cmd[@]}" --out "$report"; fi ;;
        bitnet) run bitnet "$results/bitnet_kernels.json" python3 scripts/gpu/test_bitnet_kernels.py --out "$results/bitnet_kernels.json" ;;
        unit) run unit "$results/unit_gpu.json" python3 scripts/gpu/run_gpu_unit_tests.py --megatron "$megatron" --out "$results/unit_gpu.json" ${UNIT_TESTS:-} ;;
        bench) run bench "$results/bench_bitnet.json" python3 scripts/bench_bitnet.py --out-dir "$results" ;;
        gptstep) run gptstep "$results/bench_bitnet_gpt_step.json" python3 scripts/gpu/bench_bitnet_gpt_step.py --megatron "$megatron" --out-dir "$results" --iters "${GPT_STEP_ITERS:-30}" ;;
        gptaccum) run gptaccum "$results/bench_bitnet_gpt_step_mb4.json" python3 scripts/gpu/bench_bitnet_gpt_step.py --megatron "$megatron" --out-dir "$results" --iters "${GPT_STEP_ITERS:-30}" --micro-batches 4 --variants bitnet,bitnet_dgrad_cached ;;
        h1step) run h1step "$results/bench_bitnet_gpt_step_falcon_h1_0.5b.json" python3 scripts/gpu/bench_bitnet_gpt_step.py --megatron "$megatron" --out-dir "$results" --iters "${GPT_STEP_ITERS:-30}" --model falcon_h1_0.5b --variants bitnet ;;
        adam) run adam "$results/bench_adam.json" python3 scripts/gpu/bench_adam.py --out-dir "$results" ;;
        ce) run ce "$results/bench_cross_entropy.json" python3 scripts/gpu/bench_cross_entropy.py --out-dir "$results" ;;
        fusion) run fusion "$results/bench_hybrid_fusion.json" python3 scripts/gpu/bench_hybrid_fusion.py --out-dir "$results" ;;
        sdpa) run sdpa "$results/bench_sdpa.json" python3 scripts/gpu/bench_sdpa.py --out-dir "$results" ;;
        layout) run layout "$results/bench_layout_swap.json" python3 scripts/gpu/bench_layout_swap.py --out-dir "$results" ;;
        falconh1) name=${FALCON_H1_NAME:-bench_falcon_h1}  # the results file stem (--name)
                  run falconh1 "$results/$name.json" python3 scripts/gpu/bench_falcon_h1.py --megatron "$megatron" --out-dir "$results" --name "$name" ${FALCON_H1_BENCH_ARGS:-} ;;
        resume) run resume "$results/adam_resume.json" python3 scripts/gpu/check_adam_resume.py --megatron "$megatron" --out "$results/adam_resume.json" --work "$results/work_resume" ;;
        convert) run convert "$results/falcon_h1_conversion.json" python3 scripts/gpu/check_falcon_h1_conversion.py --out "$results/falcon_h1_conversion.json" ;;
        *) echo "unknown step $step"; printf '%s\t2\t0\t-\n' "$step" >> "$steps_tsv"; status=1 ;;
    esac
done
echo "=== summary ($results/summary.json)"
python3 scripts/gpu/gpu_job_summary.py --steps "$steps_tsv" --environment "$results/environment.json" \
    --out "$results/summary.json" || status=1  # also red when a step exited 0 with failures
rm -f "$steps_tsv"
[ $status -eq 0 ] && echo "=== all steps passed" || echo "=== SOME STEPS FAILED (see above and $results/summary.json)"
exit $status
