#!/usr/bin/env bash
# LoRA training throughput of lmms-ft vs transformers + peft (plain PyTorch AdamW loop) on
# CPU: the same random Qwen2-VL-shaped model (hidden 512, 8 layers, the real 151,936-token
# vocabulary), the same 250-600-token samples with one or two photo-sized images, the same
# hyper-parameters and thread count, each side in its own process (so each VmHWM is its own),
# then one table with the ratios (step time and peak RSS of lmms-ft over transformers + peft).
#
#   scripts/bench/train_throughput.sh [THREADS [STEPS [WARMUP [ROUNDS]]]]  (defaults 2, 10, 2, 3)
#
# The sides alternate over ROUNDS rounds and their step times are pooled, so a change in
# the machine's load during the benchmark falls on both.
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${1:-2}
STEPS=${2:-10}
WARMUP=${3:-2}
ROUNDS=${4:-3}
eval "$(bash scripts/setup.sh --print-env)"
PY=${LMMS_FT_PYTHON:-$VIRTUAL_ENV/bin/python}
TARGET=${CARGO_TARGET_DIR:-$HOME/.cache/lmms-ft/target}
cargo build -q -p lmms-ft-qwen2-vl --example train_throughput
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" scripts/bench/train_throughput.py make "$WORK/model" 2>/dev/null | sed 's/^/samples: /'
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
echo "machine: $(nproc --all) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for _ in $(seq "$ROUNDS"); do
  "$PY" scripts/bench/train_throughput.py run "$WORK/model" "$STEPS" "$WARMUP" "$THREADS" 2>/dev/null >>"$WORK/transformers.json"
  "$TARGET/debug/examples/train_throughput" "$WORK/model" "$STEPS" "$WARMUP" "$THREADS" >>"$WORK/lmms-ft.json"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" scripts/bench/train_throughput.py table "$WORK/transformers.json" "$WORK/lmms-ft.json"
