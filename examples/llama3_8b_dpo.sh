#!/usr/bin/env bash
# DPO (beta 0.1) for Llama-3-8B on 2 nodes x 8 H100. Run it on every node with NNODES=2,
# NODE_RANK=0/1 and MASTER_ADDR=<node 0>, or submit llama3_8b_dpo.sbatch. Inputs: llama3_8b.sh.
LOSS=dpo BETA=${BETA:-0.1} exec bash "$(dirname "${BASH_SOURCE[0]}")/llama3_8b.sh" "$@"
