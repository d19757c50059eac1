#!/usr/bin/env bash
# LoRA fine-tuning of Qwen2-VL-7B-Instruct on video question answering.
#
# Data: annotations in LLaVA's format with a `video` entry and `<video>` in the first human
# turn, videos in any format ffmpeg reads:
#   data/my_videos/videos/rain.mp4
#   data/my_videos/annotations/train.json
#     [{"id": "0", "video": "rain.mp4", "conversations": [
#         {"from": "human", "value": "<video>\nWhat happens in the clip?"},
#         {"from": "gpt", "value": "Rain starts falling on a street."}]}]
# Frames are sampled at 2 per second (4 to 768 frames; data.video_fps / video_min_frames /
# video_max_frames), each within a pixel budget (data.video_max_pixels) that bounds the
# tokens a clip costs.
#
# Usage: example_scripts/qwen2-vl-video-lora.sh [--tiny]
#   DATA=DIR        dataset directory (default data/my_videos)
#   MODEL_PATH=DIR  a local checkpoint (default: Qwen/Qwen2-VL-7B-Instruct from the HF cache)
#   --tiny          a tiny random Qwen2-VL, generated 4-frame clips, CPU (what the tests run)
# Outputs go to a fresh directory under ./lmms-ft-runs/ (RUN_DIR overrides), printed at the end.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DATA="${DATA:-data/my_videos}"
MODEL=(--model qwen2-vl-7b-instruct)
[ -n "${MODEL_PATH:-}" ] && MODEL=(--model-path "$MODEL_PATH")
BUDGET=(--set data.video_max_pixels=$((360 * 420)) --set data.video_max_frames=32)
if [ "$TINY" = 1 ]; then
  DATA="$RUN/data/my_videos"
  tiny_python "$REPO/scripts/oracle/qwen2_vl_fixture.py" "$RUN/models/qwen2-vl-tiny" qwen2_vl "$HUB_FILES"
  tiny_python "$REPO/scripts/oracle/example_data.py" video "$DATA"
  MODEL=(--model-path "$RUN/models/qwen2-vl-tiny")
  BUDGET=(--set data.video_max_pixels=$((56 * 56)))
fi
OUT="$RUN/qwen2-vl-video-lora"
COMMON=(--config "$REPO/configs/qwen2-vl.toml" "${MODEL[@]}"
        --data "$DATA/annotations/train.json" --video-folder "$DATA/videos" "${BUDGET[@]}")

say "checking every sample (videos decode, token lengths within data.max_length)"
"$LMMS_FT" validate-data "${COMMON[@]}"

say "LoRA on the LLM (vision tower and merger frozen)"
"$LMMS_FT" train "${COMMON[@]}" --output-dir "$OUT" --set train.mode=lora "${TINY_SETS[@]}"

say "done: LoRA adapter in $OUT; run outputs in $RUN"
