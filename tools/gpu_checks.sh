#!/usr/bin/env bash
# Every GPU figure of the H100 path in one budgeted command (the lent device gives a session
# about 15 minutes in all, machine start included, and 10 minutes per command).
#
#   bash tools/gpu_checks.sh OUT_DIR [TOTAL_SECONDS]
#
# On the device tool (after `bash ../shared/device/stage-wheels.sh` here; carry [".whl"]):
#   bash .whl/setup.sh && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && bash tools/gpu_checks.sh $OUT 480
# (480 s of the 600 s a device command may run: setup.sh installs the wheels first.)
#
# Stages run in order of value, each under its own time limit, so a slow stage cannot eat the
# others' time, and every stage leaves its files behind even when cut short (the benchmark
# rewrites its JSON after each configuration). Seven files at most (the device returns eight):
#   gpu_tests.log  gpu_record.jsonl  bench-1b.json  bench-8b-slice.json  bench-8b-fused.json
#   logs.tar.gz (every stage's log, the profiler tables)  summary.txt
set -uo pipefail
out=${1:?usage: bash tools/gpu_checks.sh OUT_DIR [TOTAL_SECONDS]}
total=${2:-480}
case "$total" in ''|*[!0-9]*) echo "error: TOTAL_SECONDS must be a whole number of seconds, got '$total'" >&2; exit 2;; esac
mkdir -p "$out" || { echo "error: cannot create OUT_DIR $out" >&2; exit 2; }
out=$(cd "$out" && pwd)  # absolute: the script changes directory next
cd "$(dirname "$0")/.."
# Fewer out-of-memory failures from fragmentation at the 8b-slice's ~70 GB.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
summary="$out/summary.txt"
start=$(date +%s)
: > "$summary"

note() { echo "$*" | tee -a "$summary"; }

# stage NAME SHARE_PERCENT COMMAND...: run COMMAND (a program, no pipeline: timeout signals it
# directly) with SHARE_PERCENT of TOTAL_SECONDS, never past what is left of TOTAL_SECONDS minus
# 15 s to pack the results; its output goes to $out/logs/NAME.log, its tail to the summary.
stage() {
    local name=$1 share=$2; shift 2
    local now left limit rc t0
    now=$(date +%s)
    left=$(( total - (now - start) - 15 ))
    limit=$(( total * share / 100 ))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        note "[$name] skipped: ${left}s left"
        return
    fi
    t0=$now
    timeout --kill-after=10 "$limit" "$@" > "$out/logs/$name.log" 2>&1
    rc=$?
    grep -v -i -E 'warn|USDT|^\s*$' "$out/logs/$name.log" | tail -n 20 >> "$summary"
    note "[$name] exit $rc in $(( $(date +%s) - t0 ))s (limit ${limit}s)$( ((rc == 124 || rc == 137)) && echo ', TIMED OUT')"
}

mkdir -p "$out/logs"
note "gpu_checks: $(date -u +%FT%TZ), budget ${total}s"
python3 - <<'PY' 2>&1 | grep -v -i warn | tee -a "$summary"
import torch
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA", "| torch", torch.__version__)
try:
    import megatron.core, transformer_engine
    print("megatron-core", megatron.core.__version__, "| transformer_engine", transformer_engine.__version__)
except Exception as exc:
    print("import failed:", exc)
PY

# 1. The gpu-marked tests (tiny models): TE THD vs local, FP8 steps, step-0 identity, multiples of 16.
stage gpu-tests 30 env MEGATRON_PREF_GPU_RECORD="$out/gpu_record.jsonl" \
    python3 -m pytest -m gpu -q -rA -p no:cacheprovider tests/test_gpu.py
[ -f "$out/logs/gpu-tests.log" ] && cp "$out/logs/gpu-tests.log" "$out/gpu_tests.log"

# 2. The benchmark at the targets' presets, 8b-slice first (MFU >= 50%, FP8 >= 1.3x), profiled.
#    Fewer timed steps than the default: a fixed pair set's step time varies little.
#    GPU_CHECKS_LARGE / GPU_CHECKS_SMALL / GPU_CHECKS_BENCH_ARGS replace the presets and add
#    benchmark flags (tests/test_packaging.py runs this script on CPU with the tiny preset).
large=${GPU_CHECKS_LARGE:-8b-slice} small=${GPU_CHECKS_SMALL:-1b}
read -r -a extra <<< "${GPU_CHECKS_BENCH_ARGS:-}"
bench=(python3 tools/benchmark_pref.py --steps 6 --warmup 2 "${extra[@]}")
# The targets' pairs first (packed vs hf, then FP8), so a stage cut short still has a ratio.
order=(--configs packed,hf,packed-fp8,padded)
stage bench-8b-slice 25 "${bench[@]}" "${order[@]}" --preset "$large" --out "$out/bench-8b-slice.json" \
    --profile "$out/logs/profiles"
stage bench-1b 20 "${bench[@]}" "${order[@]}" --preset "$small" --out "$out/bench-1b.json"
stage bench-8b-fused 15 "${bench[@]}" --preset "$large" --configs packed,packed-fp8 --fusions on \
    --skip-logprob-stage --out "$out/bench-8b-fused.json"

tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$out/logs"
note "gpu_checks: done in $(( $(date +%s) - start ))s"
