#!/usr/bin/env bash
# Build your own small Chinese LLaVA: Qwen2.5-0.5B-Instruct + Chinese-CLIP ViT-B/16
# (OFA-Sys/chinese-clip-vit-base-patch16, a ChineseCLIPModel: only its vision tower is
# used), in the LLaVA paper's two stages.
#   Stage 1: vision tower and LLM frozen, only the new projector trains (image-caption pairs).
#   Stage 2: from stage 1's output, projector and LLM train, the vision tower stays frozen.
# Each stage's output is a standard LlavaForConditionalGeneration directory (ChatML template,
# the tower's own image settings: an exact square resize, no crop, after LLaVA's padding).
#
# Usage: example_scripts/build-llava-qwen2.5-chinese-clip.sh [--tiny]
#   LLM=DIR    Qwen/Qwen2.5-0.5B-Instruct (default checkpoints/Qwen2.5-0.5B-Instruct)
#   TOWER=DIR  OFA-Sys/chinese-clip-vit-base-patch16 as safetensors
#              (default checkpoints/chinese-clip-vit-base-patch16)
#   PRETRAIN_DATA / PRETRAIN_IMAGES, INSTRUCT_DATA / INSTRUCT_IMAGES as in
#              build-llava-llama3.2-siglip.sh
#   --tiny     tiny random Qwen2 (the real Qwen2.5 tokenizer) and ChineseCLIPModel written by
#              transformers, generated data, CPU
# Outputs go to a fresh directory under ./lmms-ft-runs/ (RUN_DIR overrides), printed at the end.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LLM="${LLM:-checkpoints/Qwen2.5-0.5B-Instruct}"
TOWER="${TOWER:-checkpoints/chinese-clip-vit-base-patch16}"
PRETRAIN_DATA="${PRETRAIN_DATA:-data/llava-pretrain/blip_laion_cc_sbu_558k.json}"
PRETRAIN_IMAGES="${PRETRAIN_IMAGES:-data/llava-pretrain/images}"
INSTRUCT_DATA="${INSTRUCT_DATA:-data/llava-instruct/llava_v1_5_mix665k.json}"
INSTRUCT_IMAGES="${INSTRUCT_IMAGES:-data/llava-instruct/images}"
if [ "$TINY" = 1 ]; then
  tiny_python "$REPO/scripts/oracle/build_llava.py" sources_chinese "$RUN/sources" "$HUB_FILES"
  LLM="$RUN/sources/qwen2.5" TOWER="$RUN/sources/chinese-clip-full"
  PRETRAIN_DATA="$RUN/sources/data.json" PRETRAIN_IMAGES="$RUN/sources/images"
  INSTRUCT_DATA="$PRETRAIN_DATA" INSTRUCT_IMAGES="$PRETRAIN_IMAGES"
fi

say "stage 1: projector only"
"$LMMS_FT" train --config "$REPO/configs/build-llava-stage1.toml" \
  --set "model.text_model=$LLM" --set "model.vision_tower=$TOWER" \
  --data "$PRETRAIN_DATA" --image-folder "$PRETRAIN_IMAGES" --output-dir "$RUN/stage1" \
  "${TINY_SETS[@]}"

say "stage 2: projector and LLM, vision tower frozen, from stage 1's output"
"$LMMS_FT" train --config "$REPO/configs/build-llava-stage2.toml" --model-path "$RUN/stage1" \
  --data "$INSTRUCT_DATA" --image-folder "$INSTRUCT_IMAGES" --output-dir "$RUN/stage2" \
  "${TINY_SETS[@]}"

say "done: stage 1 in $RUN/stage1, stage 2 (the model) in $RUN/stage2"
