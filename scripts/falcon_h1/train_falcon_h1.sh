#!/usr/bin/env bash
# Single-node Falcon-H1 pre-training through pretrain_mamba.py (torchrun).
#
#   PRESET=0.5b NPROC=8 TP=1 PP=1 bash scripts/falcon_h1/train_falcon_h1.sh [extra Megatron flags]
#   HF_CONFIG=/path/Falcon-H1-7B-Base/config.json NPROC=8 TP=4 SP=1 bash scripts/falcon_h1/train_falcon_h1.sh ...
#
# Parallel sizes: TP (any size that divides the attention and Mamba heads, also more ranks than
# Mamba groups / KV heads; checked by falcon_h1_args.py before the launch), SP=1 (sequence
# parallelism, with either spec), CP (context parallelism: with the local spec the attention
# all-gathers keys and values over the CP ranks), PP (layers split evenly over the stages).
#
# Model flags come from scripts/falcon_h1/falcon_h1_args.py (PRESET, or HF_CONFIG: recommended,
# it reads every shape and multiplier from the release config). Data: set DATA_PATH (Megatron
# indexed dataset prefix) and TOKENIZER_MODEL (HF tokenizer dir), or leave DATA_PATH unset for
# --mock-data. Everything after the script name is passed through (and wins over defaults).
#
# Speed defaults (results/README.md: on one H100 the 0.5B step with these defaults and the TE
# spec ran 3.46-4.42x the tokens/s of HF transformers, without TE 2.497x; eager 0.63-0.88x,
# host-bound; HF's own host-bound step moves between calls, hence the ranges):
#   IMPL=auto|transformer_engine|local   auto: Transformer Engine when it imports, else local
#   CUDA_GRAPHS=full_iteration|local|none   default full_iteration on GPUs (none without CUDA;
#   with a graph --no-check-for-nan-in-loss-and-grad and --rerun-mode disabled). local: upstream's
#   per-layer graphs (the host still runs the schedule, embedding, loss and optimizer): 0.5B on
#   one H100 with TE 107.5 ms and 17.8 GB peak vs 103.6 ms and 21.9 GB for full_iteration
#   (two calls; losses within 4e-5 of the eager run of its call)
#   OPTIMIZER_GRAPH=auto|0|1   1 also captures the optimizer step (upstream --optimizer-cuda-graph;
#   needs a CUDA graph; without Transformer Engine or Apex the gradient clipping it captures
#   stays on the device through patch 0045, not timed yet). auto: on with a CUDA graph,
#   Transformer Engine and one data-parallel rank (NPROC x NNODES = TP x PP x CP): with
#   the distributed optimizer this script uses it measured as fast as without (110.8 vs 110.2 ms
#   on one H200); with more data-parallel ranks it has not been measured yet
#   BATCH_FIRST=auto|0|1   --mamba-batch-first (Mamba layers transpose the hidden states
#   instead of their wider in_proj and scan outputs; same math); auto: on unless SP=1 or CP>1,
#   which it cannot serve
#   TORCH_FUSED_ADAM=auto|0|1   --use-torch-fused-adam (PyTorch's fused AdamW instead of TE's
#   FusedAdam or the non-fused fallback: 0.5B step 108.5 vs 111.5 ms on one H200 with TE and both
#   graphs, without the distributed optimizer); auto: on with a GPU. Not restored from checkpoints:
#   a run saved with TE's FusedAdam resumes with PyTorch's and back (patch 0032 converts the step
#   count and keeps each Adam's own settings; scripts/gpu/check_adam_resume.py checks it on a GPU)
#   CROSS_ENTROPY=auto|triton|unfused   triton: the language-model loss in two Triton passes over
#   the bf16 logits (--cross-entropy-loss-fusion --cross-entropy-fusion-impl triton; 0.5B step
#   on one H200 with TE and both graphs: 104.0 -> 100.5 ms, the loss alone 4.6 -> 0.5 ms,
#   results/h200/falcon_h1/bench_falcon_h1_tce.json, bench_cross_entropy.json); auto: triton
#   with a GPU (the kernels need CUDA)
# The local spec uses torch norms (--no-persist-layer-norm); without TE its fused RoPE is the
# Triton kernel of patch 0039 on GPUs (0.5B, one H100, no TE: 129.9 ms = 2.497x HF with it,
# bench_falcon_h1_no_te_launcher_279cb2e.json), unfused RoPE without a GPU or Triton; without
# apex, gradient-accumulation fusion is off.
# Logs (and TensorBoard scalars, with --tensorboard-dir) every 10 iterations: with one
# model-parallel rank the iterations between read nothing off the GPU (patch 0035), so the host
# queues the next step while the GPU runs this one.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
megatron=${MEGATRON:-$root/build/Megatron-LM}
python=${PYTHON:-python3}
sizes=(--tensor-model-parallel-size "${TP:-1}" --context-parallel-size "${CP:-1}")
if [ -n "${HF_CONFIG:-}" ]; then
    mapfile -t model < <("$python" "$root/scripts/falcon_h1/falcon_h1_args.py" --hf-config "$HF_CONFIG" "${sizes[@]}")
else
    mapfile -t model < <("$python" "$root/scripts/falcon_h1/falcon_h1_args.py" --preset "${PRESET:-0.5b}" "${sizes[@]}")
fi
[ ${#model[@]} -gt 0 ] || exit 1
if [ -n "${DATA_PATH:-}" ]; then
    data=(--data-path "$DATA_PATH" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL" --split 99,1,0)
else
    data=(--mock-data --tokenizer-type NullTokenizer)
fi
parallel=("${sizes[@]}" --pipeline-model-parallel-size "${PP:-1}")
case ${SP:-0} in
    0) ;;
    1) parallel+=(--sequence-parallel) ;;
    *) echo "SP must be 0 or 1, got '$SP'" >&2; exit 2 ;;
esac
impl=${IMPL:-auto}
have() { "$python" -c "import $1" >/dev/null 2>&1; }
if [ "$impl" = auto ]; then
    if have transformer_engine.pytorch; then impl=transformer_engine; else impl=local; fi
fi
case $impl in
    transformer_engine) speed=(--transformer-impl transformer_engine) ;;
    local) speed=(--transformer-impl local --no-persist-layer-norm) ;;
    *) echo "IMPL must be auto, transformer_engine or local, got '$impl'" >&2; exit 2 ;;
esac
have fused_weight_gradient_mlp_cuda || speed+=(--no-gradient-accumulation-fusion)
gpu=1
"$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null || gpu=0
if [ "$impl" = local ] && ! have transformer_engine.pytorch; then
    { [ "$gpu" = 1 ] && have triton; } || speed+=(--no-rope-fusion)
fi
graphs=${CUDA_GRAPHS:-full_iteration}
[ "$gpu" = 1 ] || graphs=${CUDA_GRAPHS:-none}
case $graphs in
    none) ;;
    # With the graph the NaN check is off, so upstream's rerun state machine has nothing to
    # validate; off, it no longer all-reduces and reads a flag every step (0.5B step on one
    # H200: 109.6 -> 106.6 ms, results/h200/falcon_h1/bench_falcon_h1_norerun.json).
    full_iteration) speed+=(--cuda-graph-impl full_iteration --no-check-for-nan-in-loss-and-grad
                            --rerun-mode disabled) ;;
    local) speed+=(--cuda-graph-impl local --no-check-for-nan-in-loss-and-grad
                   --rerun-mode disabled) ;;
    *) echo "CUDA_GRAPHS must be full_iteration, local or none, got '$graphs'" >&2; exit 2 ;;
esac
optimizer_graph=${OPTIMIZER_GRAPH:-auto}
if [ "$optimizer_graph" = auto ]; then
    optimizer_graph=0
    world=$(( ${NPROC:-8} * ${NNODES:-1} )) model_ranks=$(( ${TP:-1} * ${PP:-1} * ${CP:-1} ))
    if [ "$graphs" != none ] && [ "$world" -eq "$model_ranks" ] \
            && have transformer_engine.pytorch; then
        optimizer_graph=1
    fi
fi
case $optimizer_graph in
    0) ;;
    1) if [ "$graphs" = none ]; then
           echo "OPTIMIZER_GRAPH=1 needs CUDA_GRAPHS=full_iteration or local (a GPU)" >&2
           exit 2
       fi
       speed+=(--optimizer-cuda-graph) ;;
    *) echo "OPTIMIZER_GRAPH must be auto, 0 or 1, got '${OPTIMIZER_GRAPH}'" >&2; exit 2 ;;
esac
batch_first=${BATCH_FIRST:-auto}
if [ "$batch_first" = auto ]; then
    batch_first=1
    { [ "${SP:-0}" = 1 ] || [ "${CP:-1}" != 1 ]; } && batch_first=0
fi
case $batch_first in
    0) ;;
    1) if [ "${SP:-0}" = 1 ] || [ "${CP:-1}" != 1 ]; then
           echo "BATCH_FIRST=1 cannot run with SP=1 or CP>1 (use BATCH_FIRST=auto or 0)" >&2
           exit 2
       fi
       speed+=(--mamba-batch-first) ;;
    *) echo "BATCH_FIRST must be auto, 0 or 1, got '${BATCH_FIRST}'" >&2; exit 2 ;;
esac
torch_adam=${TORCH_FUSED_ADAM:-auto}
[ "$torch_adam" = auto ] && torch_adam=$gpu
case $torch_adam in
    0) ;;
    1) speed+=(--use-torch-fused-adam) ;;
    *) echo "TORCH_FUSED_ADAM must be auto, 0 or 1, got '${TORCH_FUSED_ADAM}'" >&2; exit 2 ;;
esac
cross_entropy=${CROSS_ENTROPY:-auto}
if [ "$cross_entropy" = auto ]; then
    cross_entropy=unfused
    [ "$gpu" = 1 ] && cross_entropy=triton
fi
case $cross_entropy in
    unfused) ;;
    triton) speed+=(--cross-entropy-loss-fusion --cross-entropy-fusion-impl triton) ;;
    *) echo "CROSS_ENTROPY must be auto, triton or unfused, got '${CROSS_ENTROPY}'" >&2; exit 2 ;;
esac
training=(
    "${speed[@]}" --bf16 --use-distributed-optimizer
    --seq-length "${SEQ_LEN:-4096}" --max-position-embeddings "${SEQ_LEN:-4096}"
    --micro-batch-size "${MBS:-2}" --global-batch-size "${GBS:-256}"
    --train-iters "${TRAIN_ITERS:-10000}" --lr "${LR:-3e-4}" --min-lr "${MIN_LR:-3e-5}"
    --lr-decay-style cosine --lr-warmup-iters "${WARMUP:-200}" --weight-decay 0.1 --clip-grad 1.0
    --attention-dropout 0.0 --hidden-dropout 0.0
    --log-interval 10 --tensorboard-log-interval 10 --log-throughput
    --eval-interval 1000 --eval-iters 10
)
# The data loader's [b, 1, s, s] causal mask repeats what the causal mask type computes (unless
# --reset-attention-mask makes it document-wise): building it costs host time every step, and with
# a mask the local spec's attention cannot take its flash kernel (on one H200 the 0.5B local step
# spent 48 ms per step in memory-efficient attention, results/README.md).
case " $* " in
    *" --reset-attention-mask "*) ;;
    *) training+=(--no-create-attention-mask-in-dataloader) ;;
esac
[ -n "${SAVE:-}" ] && training+=(--save "$SAVE" --save-interval "${SAVE_INTERVAL:-1000}")
[ -n "${LOAD:-}" ] && training+=(--load "$LOAD")
export PYTHONPATH=$megatron${PYTHONPATH:+:$PYTHONPATH}
exec torchrun --nproc-per-node "${NPROC:-8}" --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    "$megatron/pretrain_mamba.py" "${model[@]}" "${data[@]}" "${parallel[@]}" "${training[@]}" "$@"
