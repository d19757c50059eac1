#!/usr/bin/env bash
# QLoRA fine-tuning of Qwen2.5-VL-7B-Instruct on one GPU: the LLM's linear layers are held
# as 4-bit NF4 codes (double-quantised scales, bitsandbytes' format), LoRA trains on top, and
# the result is a PEFT adapter. Then the adapter is merged into the unquantised model, a
# standard checkpoint.
# (peak on CPU for the 7B: 8.3 GiB against 17.4 GiB for bf16 LoRA; docs/benchmarks.md)
#
# Data: the layout of llava-custom-data.sh (data/my_dataset/images/ and
# data/my_dataset/annotations/train.json, LLaVA's `conversations` format).
#
# Usage: example_scripts/qlora-7b.sh [--tiny]
#   DATA=DIR        dataset directory (default data/my_dataset)
#   MODEL_PATH=DIR  a local checkpoint (default: Qwen/Qwen2.5-VL-7B-Instruct from the HF cache)
#   --tiny          QLoRA on a tiny random Qwen2.5-VL with generated data, CPU (what the tests run)
# Outputs go to a fresh directory under ./lmms-ft-runs/ (RUN_DIR overrides), printed at the end.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DATA="${DATA:-data/my_dataset}"
MODEL=(--model qwen2.5-vl-7b-instruct)
BASE="${MODEL_PATH:-}"
[ -n "$BASE" ] && MODEL=(--model-path "$BASE")
if [ "$TINY" = 1 ]; then
  DATA="$RUN/data/my_dataset"
  BASE="$RUN/models/qwen2.5-vl-tiny"
  tiny_python "$REPO/scripts/oracle/qwen2_vl_fixture.py" "$BASE" qwen2_5_vl "$HUB_FILES"
  tiny_python "$REPO/scripts/oracle/example_data.py" images "$DATA"
  MODEL=(--model-path "$BASE")
fi
OUT="$RUN/qwen2.5-vl-7b-qlora"

say "QLoRA: 4-bit NF4 base, LoRA r=16 on every LLM linear"
"$LMMS_FT" train --config "$REPO/configs/qwen2.5-vl.toml" "${MODEL[@]}" \
  --data "$DATA/annotations/train.json" --image-folder "$DATA/images" --output-dir "$OUT" \
  --set train.mode=qlora --set quant.type=nf4 --set quant.double_quant=true \
  --set lora.r=16 --set lora.alpha=32 \
  "${TINY_SETS[@]}"

if [ -n "$BASE" ]; then
  say "merging the adapter into the unquantised base"
  "$LMMS_FT" merge-lora --base "$BASE" --adapter "$OUT" --out "$RUN/qwen2.5-vl-7b-merged"
  MERGED=" merged model in $RUN/qwen2.5-vl-7b-merged;"
else
  MERGED=" (merge it with: lmms-ft merge-lora --base MODEL_DIR --adapter $OUT --out DIR);"
fi
say "done: adapter in $OUT;$MERGED run outputs in $RUN"
