"""Loads an lmms-ft adapter with peft and an lmms-ft merged checkpoint with transformers, and
compares their logits with the ones lmms-ft computed.

Usage: python train_peft_check.py FIXTURE_DIR ADAPTER_DIR MERGED_DIR OURS.safetensors

OURS.safetensors holds lmms-ft's logits per sample (`text`, `image`, ...) with the adapter
applied. Any warning from peft about missing or unexpected adapter keys is turned into an
error: peft otherwise falls back silently to the base model. Prints one JSON line with, per
sample, the max |diff| of peft's logits vs lmms-ft's, of the base model's vs lmms-ft's, and of
the merged model's vs lmms-ft's.
"""

import json
import os
import sys
import warnings

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

fixture, adapter, merged, ours_path = sys.argv[1:5]
warnings.filterwarnings("error", message=".*(missing|unexpected).*adapter.*")
warnings.filterwarnings("error", message=".*adapter.*(missing|unexpected).*")

from peft import PeftModel  # noqa: E402

ref = load_file(os.path.join(fixture, "reference.safetensors"))
ours = load_file(ours_path)


def inputs(name):
    kw = {"input_ids": ref[f"{name}.input_ids"]}
    # Qwen-VL: rope positions and patch grids; Mllama: tiles' aspect ratios and the
    # cross-attention mask.
    for k in ("position_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
              "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"):
        if f"{name}.{k}" in ref:
            kw[k] = ref[f"{name}.{k}"]
    return kw


def logits(model):
    with torch.no_grad():
        return {n: model(**inputs(n)).logits for n in ours}


base_model = AutoModelForImageTextToText.from_pretrained(fixture, dtype=torch.float32).eval()
base = logits(base_model)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    peft_model = PeftModel.from_pretrained(base_model, adapter).eval()
bad = [str(w.message) for w in caught if "adapter" in str(w.message).lower() and ("missing" in str(w.message).lower() or "unexpected" in str(w.message).lower())]
if bad:
    raise SystemExit("peft warned: " + " | ".join(bad))
with_adapter = logits(peft_model)
merged_model = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).eval()
merged_logits = logits(merged_model)
result = {
    n: {
        "peft_vs_ours": float((with_adapter[n] - ours[n]).abs().max()),
        "base_vs_ours": float((base[n] - ours[n]).abs().max()),
        "merged_vs_ours": float((merged_logits[n] - ours[n]).abs().max()),
    }
    for n in ours
}
print(json.dumps(result))
