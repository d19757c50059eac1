"""Loads a full fine-tuning output directory written by `lmms-ft train` with transformers and
compares its logits with the ones lmms-ft computed from the same directory.

Usage: python train_full_check.py FIXTURE_DIR TRAINED_DIR OURS.safetensors

FIXTURE_DIR is the base checkpoint of `qwen2_vl_fixture.py` (its `reference.safetensors` holds
the model inputs per sample); OURS.safetensors holds lmms-ft's logits per sample. Prints one
JSON line with, per sample, the max |diff| of transformers' logits for TRAINED_DIR vs lmms-ft's,
and of the base model's vs lmms-ft's (which must be large: training changed the weights).
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

fixture, trained, ours_path = sys.argv[1:4]
ref = load_file(os.path.join(fixture, "reference.safetensors"))
ours = load_file(ours_path)


def inputs(name):
    kw = {"input_ids": ref[f"{name}.input_ids"], "position_ids": ref[f"{name}.position_ids"]}
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if f"{name}.{k}" in ref:
            kw[k] = ref[f"{name}.{k}"]
    return kw


def logits(path):
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return {n: model(**inputs(n)).logits for n in ours}


hf = logits(trained)
base = logits(fixture)
print(json.dumps({
    n: {
        "hf_vs_ours": float((hf[n] - ours[n]).abs().max()),
        "base_vs_ours": float((base[n] - ours[n]).abs().max()),
    }
    for n in ours
}))
