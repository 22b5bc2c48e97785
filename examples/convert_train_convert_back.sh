#!/usr/bin/env bash
# The whole path on one 8-GPU node (NNODES=2 etc. for two): Hugging Face checkpoint ->
# megatron-core checkpoint -> preference data -> DPO/SPO training -> Hugging Face checkpoint.
#
#   HF_DIR=/models/Meta-Llama-3-8B-Instruct DATA=/data/prefs.jsonl WORK=/runs/llama3-8b-dpo \
#     bash examples/convert_train_convert_back.sh
#
#   MODEL=llama3_8b (default) | qwen2.5_7b     LOSS=dpo (default) | spo
#   VERIFY=1: compare HF and converted logits after conversion (needs memory for both models)
#   DRY_RUN=1: print the commands only
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

HF_DIR=${HF_DIR:?set HF_DIR to a Hugging Face model directory (config.json, *.safetensors, tokenizer)}
DATA=${DATA:?set DATA to preference pairs (.jsonl or .parquet: prompt/chosen/rejected)}
WORK=${WORK:-runs/pref-$(basename "$HF_DIR")}
MODEL=${MODEL:-llama3_8b}
LOSS=${LOSS:-dpo}
TP=2  # the examples' tensor-parallel size (the checkpoint loads at any TP; this is recorded)
SEQ_LENGTH=${SEQ_LENGTH:-8192}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-1024}

# 1. HF -> megatron-core (dist checkpoint; the architecture travels with it).
if [[ ! -f "$WORK/mcore-init/latest" ]]; then
  run python tools/convert_hf_to_megatron.py --hf-dir "$HF_DIR" --save "$WORK/mcore-init" \
    --target-tensor-parallel-size "$TP"
fi
if [[ "${VERIFY:-0}" == 1 ]]; then
  run python tools/verify_conversion.py --hf-dir "$HF_DIR" --load "$WORK/mcore-init"
fi

# 2. Tokenise the pairs once (IndexedDataset + pair index); the same tokenizer as the model.
if [[ ! -f "$WORK/data/train.meta.json" ]]; then
  run python tools/preprocess_pref_data.py --input "$DATA" --output-prefix "$WORK/data/train" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$HF_DIR" \
    --seq-length "$SEQ_LENGTH" --max-prompt-length "$MAX_PROMPT_LENGTH"
fi

# 3. Train: the reference is the converted initial policy (precomputed log-probs by default).
LOSS=$LOSS LOAD="$WORK/mcore-init" SAVE="$WORK/ckpt" DATA_PREFIX="$WORK/data/train" TOKENIZER="$HF_DIR" \
  SEQ_LENGTH=$SEQ_LENGTH MAX_PROMPT_LENGTH=$MAX_PROMPT_LENGTH \
  bash "$(dirname "${BASH_SOURCE[0]}")/$MODEL.sh"

# 4. megatron-core -> HF (the newest complete checkpoint), with the tokenizer files beside it.
run python tools/convert_megatron_to_hf.py --load "$WORK/ckpt" --save "$WORK/hf-final"
if [[ "${DRY_RUN:-0}" != 1 ]]; then
  for f in "$HF_DIR"/tokenizer* "$HF_DIR"/special_tokens_map.json "$HF_DIR"/generation_config.json; do
    if [[ -f "$f" && ! -f "$WORK/hf-final/$(basename "$f")" ]]; then cp "$f" "$WORK/hf-final/"; fi
  done
fi
echo "done: $WORK/hf-final"
