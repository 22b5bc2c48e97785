#!/usr/bin/env bash
# SPO for Llama-3-8B on 2 nodes x 8 H100 (see llama3_8b.sh). SPO drives beta*h towards a finite
# target (--spo-target-margin, default 1.0) instead of maximising it like DPO.
LOSS=spo BETA=${BETA:-0.1} exec bash "$(dirname "${BASH_SOURCE[0]}")/llama3_8b.sh" "$@"
