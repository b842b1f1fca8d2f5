#!/bin/bash
# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

# Pre-trains a Llama-style GPT model with BitNet b1.58 linear layers (ternary weights, int8
# activations, straight-through gradients to full-precision weights) on one node.
#
#   bash examples/bitnet/train_gpt_bitnet.sh CHECKPOINT_PATH TENSORBOARD_LOGS_PATH \
#       [TOKENIZER_MODEL DATA_PATH]
#
# Without TOKENIZER_MODEL and DATA_PATH it trains on mock data.

export CUDA_DEVICE_MAX_CONNECTIONS=1

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}

CHECKPOINT_PATH=$1 #<Specify path>
TENSORBOARD_LOGS_PATH=$2 #<Specify path>
TOKENIZER_MODEL=$3 #<Specify a Hugging Face tokenizer name or directory>
DATA_PATH=$4 #<Specify path and file prefix>_text_document

DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes $NUM_NODES
    --node_rank $NODE_RANK
    --master_addr $MASTER_ADDR
    --master_port $MASTER_PORT
)

MODEL_ARGS=(
    --num-layers 16
    --hidden-size 2048
    --ffn-hidden-size 8192
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --normalization RMSNorm
    --swiglu
    --disable-bias-linear
    --position-embedding-type rope
    --rotary-base 500000
    --untie-embeddings-and-output-weights
    --seq-length 4096
    --max-position-embeddings 4096
)

# Every linear layer of the layer spec becomes a BitNet b1.58 linear; embeddings, norms and
# the output layer stay in full precision. BitNet needs the local (non-TE) layer specs.
BITNET_ARGS=(
    --transformer-impl local
    --use-bitnet
)

TRAINING_ARGS=(
    --micro-batch-size 4
    --global-batch-size 256
    --train-iters 10000
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --clip-grad 1.0
    --bf16
    --lr 1.5e-3
    --min-lr 1.5e-4
    --lr-decay-style cosine
    --lr-warmup-iters 200
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --use-distributed-optimizer
)

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 1
)

if [ -n "$DATA_PATH" ]; then
    DATA_ARGS=(
        --data-path $DATA_PATH
        --tokenizer-type HuggingFaceTokenizer
        --tokenizer-model $TOKENIZER_MODEL
        --split 99,1,0
    )
else
    DATA_ARGS=(
        --mock-data
        --tokenizer-type NullTokenizer
        --vocab-size 128256
    )
fi

EVAL_AND_LOGGING_ARGS=(
    --log-interval 10
    --log-throughput
    --save-interval 1000
    --eval-interval 1000
    --eval-iters 10
    --save $CHECKPOINT_PATH
    --load $CHECKPOINT_PATH
    --tensorboard-dir $TENSORBOARD_LOGS_PATH
)

torchrun ${DISTRIBUTED_ARGS[@]} pretrain_gpt.py \
    ${MODEL_ARGS[@]} \
    ${BITNET_ARGS[@]} \
    ${TRAINING_ARGS[@]} \
    ${MODEL_PARALLEL_ARGS[@]} \
    ${DATA_ARGS[@]} \
    ${EVAL_AND_LOGGING_ARGS[@]}
