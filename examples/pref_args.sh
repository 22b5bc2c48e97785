# Sourced by llama3_8b.sh and qwen2.5_7b_dpo.sh: the pretrain_pref.py flags both use.
# Expects LOSS, LOAD, DATA_PREFIX, TOKENIZER, SAVE and RUN_NAME; optional inputs as listed
# in llama3_8b.sh. The layout (TP=2 + sequence parallelism, PP=1, distributed optimizer) is
# justified in each model's script header.
PRETRAIN_ARGS=(
  --loss "$LOSS" --beta "${BETA:-0.1}"
  --ref-logprobs "${REF_LOGPROBS:-precompute}"
  # parallelism: see the header
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --sequence-parallel
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
  # batch: one pack per micro-batch; the global batch counts pairs
  --micro-batch-size 1 --global-batch-size "${GLOBAL_BATCH_SIZE:-128}"
  --seq-length "${SEQ_LENGTH:-8192}" --max-prompt-length "${MAX_PROMPT_LENGTH:-1024}"
  # optimisation (DPO-typical: small LR, short warmup, cosine)
  --lr "${LR:-5e-7}" --min-lr "${MIN_LR:-5e-8}" --lr-decay-style cosine --lr-warmup-iters "${WARMUP:-20}"
  --train-iters "${TRAIN_ITERS:-500}" --clip-grad 1.0 --weight-decay 0.0 --seed "${SEED:-1234}"
  # precision and kernels
  --bf16 --transformer-impl transformer_engine
  # data
  --data-path "$DATA_PREFIX" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER"
  # checkpoints, evaluation, logging
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

