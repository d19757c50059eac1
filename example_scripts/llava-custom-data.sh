#!/usr/bin/env bash
# LoRA fine-tuning of LLaVA-1.5-7B on your own images and questions, the projector trained
# too (what LLaVA's --tune_mm_mlp_adapter adds to a LoRA run), then a chat with the result.
#
# Your data, in the layout of the common LLaVA guides:
#   data/my_dataset/images/                  the pictures
#   data/my_dataset/annotations/train.json   LLaVA's format, `<image>` in the first human turn:
#     [{"id": "0", "image": "cat.jpg", "conversations": [
#         {"from": "human", "value": "<image>\nWhat is in the picture?"},
#         {"from": "gpt", "value": "A cat asleep on a sofa."}]}]
#
# Usage: example_scripts/llava-custom-data.sh [--tiny]
#   DATA=DIR        dataset directory (default data/my_dataset)
#   MODEL_PATH=DIR  a local llava-hf checkpoint (default: llava-hf/llava-1.5-7b-hf from the
#                   Hugging Face cache); `lmms-ft list-models` lists the others
#   --tiny          a tiny random LLaVA-1.5 and generated data on the CPU (what the tests run)
# Outputs go to a fresh directory under ./lmms-ft-runs/ (RUN_DIR overrides), printed at the end.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DATA="${DATA:-data/my_dataset}"
MODEL=(--model llava-1.5-7b)
[ -n "${MODEL_PATH:-}" ] && MODEL=(--model-path "$MODEL_PATH")
if [ "$TINY" = 1 ]; then
  DATA="$RUN/data/my_dataset"
  tiny_python "$REPO/scripts/oracle/llava_fixture.py" "$RUN/models/llava-1.5-tiny" llava "$HUB_FILES"
  tiny_python "$REPO/scripts/oracle/example_data.py" images "$DATA"
  MODEL=(--model-path "$RUN/models/llava-1.5-tiny")
fi
OUT="$RUN/llava-1.5-lora"
COMMON=(--config "$REPO/configs/llava.toml" "${MODEL[@]}"
        --data "$DATA/annotations/train.json" --image-folder "$DATA/images")

say "checking every sample (images decode, <image> placement, token lengths)"
"$LMMS_FT" validate-data "${COMMON[@]}"

say "LoRA on the LLM, projector trained in full and saved with the adapter"
"$LMMS_FT" train "${COMMON[@]}" --output-dir "$OUT" \
  --set train.mode=lora --set train.projector=full \
  --set 'lora.modules_to_save=["multi_modal_projector"]' \
  "${TINY_SETS[@]}"

say "chat with the fine-tuned model about the first picture"
FIRST="$(ls "$DATA/images" | head -n 1)"
printf 'What is in the picture?\n/exit\n' | "$LMMS_FT" chat "${MODEL[@]}" --adapter "$OUT" \
  --image "$DATA/images/$FIRST" --max-new-tokens 32

say "done: adapter (LoRA + projector) in $OUT; run outputs in $RUN"
