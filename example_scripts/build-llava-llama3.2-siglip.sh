#!/usr/bin/env bash
# Build your own small LLaVA: Llama-3.2-1B-Instruct + SigLIP-so400m-patch14-384, in the
# LLaVA paper's two stages.
#   Stage 1 (feature alignment): vision tower and LLM frozen, only the new projector trains,
#            on image-caption pairs (e.g. LLaVA-Pretrain's blip_laion_cc_sbu_558k.json).
#   Stage 2 (visual instruction tuning): from stage 1's output, projector and LLM train, the
#            vision tower stays frozen (e.g. on llava_v1_5_mix665k.json).
# Each stage's output is a standard LlavaForConditionalGeneration directory.
# Caveat: composing has no Llama-3 chat template yet; the model gets LLaVA-1.5's Vicuna one
# (USER: / ASSISTANT:, each answer ending in `</s>`, which Llama-3's tokenizer spells as
# plain text rather than its end-of-turn token), so generation stops at max_new_tokens.
#
# Usage: example_scripts/build-llava-llama3.2-siglip.sh [--tiny]
#   LLM=DIR       meta-llama/Llama-3.2-1B-Instruct downloaded (default checkpoints/Llama-3.2-1B-Instruct)
#   TOWER=DIR     google/siglip-so400m-patch14-384 (default checkpoints/siglip-so400m-patch14-384)
#   PRETRAIN_DATA=FILE PRETRAIN_IMAGES=DIR   stage-1 data (default data/llava-pretrain/...)
#   INSTRUCT_DATA=FILE INSTRUCT_IMAGES=DIR   stage-2 data (default data/llava-instruct/...)
#   --tiny        tiny random Llama (with a Llama-2 tokenizer: no Llama-3 tokenizer ships in
#                 this repository) and SigLIP written by transformers, generated data, CPU
# Outputs go to a fresh directory under ./lmms-ft-runs/ (RUN_DIR overrides), printed at the end.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LLM="${LLM:-checkpoints/Llama-3.2-1B-Instruct}"
TOWER="${TOWER:-checkpoints/siglip-so400m-patch14-384}"
PRETRAIN_DATA="${PRETRAIN_DATA:-data/llava-pretrain/blip_laion_cc_sbu_558k.json}"
PRETRAIN_IMAGES="${PRETRAIN_IMAGES:-data/llava-pretrain/images}"
INSTRUCT_DATA="${INSTRUCT_DATA:-data/llava-instruct/llava_v1_5_mix665k.json}"
INSTRUCT_IMAGES="${INSTRUCT_IMAGES:-data/llava-instruct/images}"
if [ "$TINY" = 1 ]; then
  tiny_python "$REPO/scripts/oracle/build_llava.py" sources_llama_siglip "$RUN/sources" "$HUB_FILES"
  LLM="$RUN/sources/llm" TOWER="$RUN/sources/siglip"
  PRETRAIN_DATA="$RUN/sources/data.json" PRETRAIN_IMAGES="$RUN/sources/images"
  INSTRUCT_DATA="$PRETRAIN_DATA" INSTRUCT_IMAGES="$PRETRAIN_IMAGES"
fi

say "stage 1: projector only (SigLIP has no class token: every patch is a feature)"
"$LMMS_FT" train --config "$REPO/configs/build-llava-stage1.toml" \
  --set "model.text_model=$LLM" --set "model.vision_tower=$TOWER" \
  --set model.vision_feature_select_strategy=full \
  --data "$PRETRAIN_DATA" --image-folder "$PRETRAIN_IMAGES" --output-dir "$RUN/stage1" \
  "${TINY_SETS[@]}"

say "stage 2: projector and LLM, vision tower frozen, from stage 1's output"
"$LMMS_FT" train --config "$REPO/configs/build-llava-stage2.toml" --model-path "$RUN/stage1" \
  --data "$INSTRUCT_DATA" --image-folder "$INSTRUCT_IMAGES" --output-dir "$RUN/stage2" \
  "${TINY_SETS[@]}"

say "done: stage 1 in $RUN/stage1, stage 2 (the model) in $RUN/stage2"
