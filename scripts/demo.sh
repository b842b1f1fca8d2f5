#!/usr/bin/env bash
# `make demo`: train a tiny Falcon-H1 (4 parallel hybrid 'P' layers, the 0.5B release's muP
# multipliers) for 50 steps on mock data, on whatever device exists (CPU here, a GPU elsewhere),
# through the real entry point pretrain_mamba.py. About a minute on 2 CPU cores.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
megatron=$root/build/Megatron-LM
python=${PYTHON:-$root/.venv/bin/python}
export PYTHONPATH=$megatron${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export PATH=$(dirname "$python"):$PATH
mapfile -t multipliers < <("$python" "$root/scripts/falcon_h1/falcon_h1_args.py" --preset 0.5b \
    | awk '/^--(embedding|lm-head|key|attention-in|attention-out|ssm-in|ssm-out|mlp|ssm)-multiplier/{p=1} /^--/{if(!/multiplier/)p=0} p')
echo "[demo] tiny Falcon-H1: pattern PPPP, hidden 64, attention 4 heads (head_dim 24) || Mamba-2 8 heads, 0.5B multipliers"
log=$(mktemp /tmp/falcon-mcore-demo.XXXXXX.log)
set +e
"$python" -m torch.distributed.run --nproc-per-node 1 --master-port "${MASTER_PORT:-29533}" \
    "$megatron/pretrain_mamba.py" \
    --transformer-impl local --mock-data --tokenizer-type NullTokenizer --vocab-size 1024 \
    --hybrid-layer-pattern PPPP --hidden-size 64 --ffn-hidden-size 128 \
    --num-attention-heads 4 --group-query-attention --num-query-groups 2 --kv-channels 24 \
    --mamba-num-heads 8 --mamba-head-dim 16 --mamba-num-groups 1 --mamba-state-dim 16 \
    --mamba-chunk-size 16 --no-mamba-rms-norm --normalization RMSNorm --swiglu \
    --disable-bias-linear --untie-embeddings-and-output-weights --position-embedding-type rope \
    --rotary-base 100000000000 "${multipliers[@]}" \
    --seq-length 128 --max-position-embeddings 128 --micro-batch-size 4 --global-batch-size 8 \
    --train-iters 50 --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 5 \
    --weight-decay 0.01 --clip-grad 1.0 --attention-dropout 0.0 --hidden-dropout 0.0 \
    --log-interval 5 --eval-iters 0 --eval-interval 1000 --seed 1234 "$@" > "$log" 2>&1
status=$?
set -e
grep -E "training on device|building Hybrid|number of parameters" "$log" | sed 's/^/[demo] /' | head -5 || true
grep -E " iteration +[0-9]+/" "$log" | sed -E 's/.*iteration +([0-9]+)\/ *([0-9]+).*elapsed time per iteration \(ms\): ([0-9.]+).*lm loss: ([0-9.E+-]+).*/[demo] step \1\/\2  lm loss \4  (\3 ms\/step)/'
if [ $status -ne 0 ]; then echo "[demo] FAILED (exit $status); log: $log"; tail -30 "$log"; exit $status; fi
echo "[demo] done; full log: $log"
