#!/usr/bin/env bash
# Qwen2.5-7B DPO on 2 nodes x 8 H100 80GB (LOSS=spo for SPO). Inputs as in llama3_8b.sh:
# LOAD (converted checkpoint), DATA_PREFIX, TOKENIZER, SAVE, FP8=1, REF_LOGPROBS, WANDB_PROJECT.
#
# Qwen2.5-7B: 28 layers, hidden 3584, 28 query / 4 KV heads, FFN 18944, vocab 152064 (untied),
# QKV bias; the architecture comes from the --load checkpoint. TP must divide 28 heads and
# 4 KV groups: 1, 2 or 4. TP=2 with sequence parallelism, PP=1, DP=8, distributed optimizer:
# per GPU 3.8 B parameters -> bf16 7.6 GB + fp32 grads 15.2 GB + sharded fp32 master/Adam
# 5.7 GB = 28.5 GB static, ~19 GB activations for an 8192-token pack, ~3 GB logits
# (152k vocab / TP 2): ~52 GB of 80 (estimate, examples/README.md). Same reasons as Llama-3-8B
# for no PP and no larger TP.
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

LOSS=${LOSS:-dpo}
LOAD=${LOAD:?set LOAD to a converted megatron checkpoint (see convert_train_convert_back.sh)}
DATA_PREFIX=${DATA_PREFIX:?set DATA_PREFIX to a tools/preprocess_pref_data.py output prefix}
TOKENIZER=${TOKENIZER:?set TOKENIZER to the Hugging Face model/tokenizer directory}
SAVE=${SAVE:-runs/qwen2.5-7b-$LOSS}
RUN_NAME=${RUN_NAME:-qwen2.5-7b-$LOSS}
if [[ -f "$SAVE/latest" ]]; then LOAD=$SAVE; fi

PRETRAIN_ARGS=(
  --loss "$LOSS" --beta "${BETA:-0.1}" --ref-logprobs "${REF_LOGPROBS:-precompute}"
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --sequence-parallel
  --use-distributed-optimizer
  --micro-batch-size 1 --global-batch-size "${GLOBAL_BATCH_SIZE:-128}"
  --seq-length "${SEQ_LENGTH:-8192}" --max-prompt-length "${MAX_PROMPT_LENGTH:-1024}"
  --lr "${LR:-5e-7}" --min-lr "${MIN_LR:-5e-8}" --lr-decay-style cosine --lr-warmup-iters "${WARMUP:-20}"
  --train-iters "${TRAIN_ITERS:-500}" --clip-grad 1.0 --weight-decay 0.0 --seed "${SEED:-1234}"
  --bf16 --transformer-impl transformer_engine
  --data-path "$DATA_PREFIX" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER"
  --load "$LOAD" --save "$SAVE" --save-interval "${SAVE_INTERVAL:-100}"
  --log-interval 1 --tensorboard-dir "$SAVE/tensorboard"
)
if [[ -n "${VALID_DATA_PREFIX:-}" ]]; then
  PRETRAIN_ARGS+=(--valid-data-path "$VALID_DATA_PREFIX" --eval-interval "${EVAL_INTERVAL:-50}" --eval-iters "${EVAL_ITERS:-20}")
fi
if [[ "${FP8:-0}" == 1 ]]; then
  PRETRAIN_ARGS+=(--fp8-format hybrid --fp8-recipe "${FP8_RECIPE:-delayed}")
fi
if [[ -n "${REF_LOAD:-}" ]]; then
  PRETRAIN_ARGS+=(--ref-load "$REF_LOAD")
fi
if [[ -n "${WANDB_PROJECT:-}" ]]; then
  PRETRAIN_ARGS+=(--wandb-project "$WANDB_PROJECT" --wandb-exp-name "$RUN_NAME")
fi

run_pretrain "${PRETRAIN_ARGS[@]}"
