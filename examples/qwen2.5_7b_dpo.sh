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

source "$(dirname "${BASH_SOURCE[0]}")/pref_args.sh"

run_pretrain "${PRETRAIN_ARGS[@]}"
