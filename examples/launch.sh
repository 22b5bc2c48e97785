#!/usr/bin/env bash
# Sourced by the example scripts: one torchrun per node, from plain environment variables or
# from a Slurm allocation (one srun task per node, see the *.sbatch files).
#
#   NNODES (default: $SLURM_NNODES or 1)      NODE_RANK (default: $SLURM_NODEID or 0)
#   MASTER_ADDR (default: localhost)          MASTER_PORT (default: 29500)
#   GPUS_PER_NODE (default: 8)                DRY_RUN=1: print the command instead of running it
set -euo pipefail

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}

# megatron-core issues tensor/sequence-parallel communication in order on one CUDA stream.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONUNBUFFERED=1

# run COMMAND...: print it under DRY_RUN=1, else run it from the repository root.
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    (cd "$REPO" && "$@")
  fi
}

# run_pretrain ARGS...: torchrun pretrain_pref.py ARGS on this node.
run_pretrain() {
  run torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    pretrain_pref.py "$@"
}
