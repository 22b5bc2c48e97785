#!/usr/bin/env bash
# Llama-3-8B preference training on 2 nodes x 8 H100 80GB (16 GPUs): LOSS=dpo (default) or spo.
# Prefer the wrappers llama3_8b_dpo.sh / llama3_8b_spo.sh and their .sbatch files.
#
# Layout: TP=2 (inside a node, NVLink) with sequence parallelism, PP=1, DP=8, distributed
# optimizer. Per GPU (estimates, examples/README.md): 4.0 B parameters -> bf16 weights 8.0 GB
# + fp32 gradient buffer 16.1 GB + fp32 master weights and Adam moments sharded over DP=8
# 6.0 GB = 30 GB static, plus ~19 GB of activations for an 8192-token pack and ~3 GB for the
# logits: ~55 GB of 80. Why not more TP or any PP:
#   * TP=1 (DP=16) needs ~54 GB static (bf16 16 + fp32 grads 32 + 6) before activations: no room.
#   * TP=4 or 8 halves the memory again but shrinks every GEMM (FFN 14336/8 = 1792 columns)
#     and adds two all-gather/reduce-scatter pairs per layer: lower tokens/s for memory we do
#     not need. Use TP=4 for 16k-token packs or an online reference model (+8 GB at TP=2).
#   * PP adds a pipeline bubble of (PP-1)/micro-batches; a preference step has few packs per
#     DP rank (here 128 pairs / ~7 pairs per pack / DP 8 = ~2-3), so PP=2 would idle ~30%.
#
# Inputs (environment):
#   LOAD         megatron checkpoint converted from HF (tools/convert_hf_to_megatron.py), or a
#                run's --save directory to resume from
#   DATA_PREFIX  preprocessed data (tools/preprocess_pref_data.py --output-prefix)
#   TOKENIZER    Hugging Face tokenizer directory (the HF model directory)
#   SAVE         where checkpoints go (default: runs/llama3-8b-$LOSS)
#   FP8=1        FP8 with --fp8-format hybrid --fp8-recipe $FP8_RECIPE (default delayed)
#   REF_LOGPROBS precompute (default: one forward pass over the data before training) | online
#   WANDB_PROJECT  also log to Weights & Biases
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

LOSS=${LOSS:-dpo}
LOAD=${LOAD:?set LOAD to a converted megatron checkpoint (see convert_train_convert_back.sh)}
DATA_PREFIX=${DATA_PREFIX:?set DATA_PREFIX to a tools/preprocess_pref_data.py output prefix}
TOKENIZER=${TOKENIZER:?set TOKENIZER to the Hugging Face model/tokenizer directory}
SAVE=${SAVE:-runs/llama3-8b-$LOSS}
RUN_NAME=${RUN_NAME:-llama3-8b-$LOSS}
# Resume: a --save directory that already holds a checkpoint takes over from LOAD.
if [[ -f "$SAVE/latest" ]]; then LOAD=$SAVE; fi

source "$(dirname "${BASH_SOURCE[0]}")/pref_args.sh"

run_pretrain "${PRETRAIN_ARGS[@]}"
