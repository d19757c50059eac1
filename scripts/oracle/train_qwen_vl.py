"""Reference training run for the Qwen-VL families: transformers + peft + a plain PyTorch
AdamW loop (the loop, its protocol and hyper-parameters are train_loop.py's).

Usage: python train_qwen_vl.py FIXTURE_DIR OUT_DIR {lora|lora_vision|full} ACCUM STEPS [bf16]

FIXTURE_DIR is made by qwen2_vl_fixture.py or qwen3_vl_fixture.py (checkpoint +
reference.safetensors with the processed inputs of four samples: text, image, two_images,
video); the family (Qwen2-VL / Qwen2.5-VL or Qwen3-VL) comes from its config.json and decides
the module names below.

lora: LoRA on every linear layer of the language model except lm_head; the merger
(projector; Qwen3-VL: with the DeepStack mergers) trains fully; the vision blocks are frozen.
lora_vision: the same, plus LoRA on every linear of the vision blocks (attn.qkv, attn.proj and
the MLP's two) at the vision lr. full: every parameter trains.

bf16: the model is loaded in bf16 (weights, norms and compute); peft keeps the LoRA
parameters in fp32 (its default `autocast_adapter_dtype`), the loss is taken in fp32, and
torch's AdamW keeps each parameter's state in the parameter's dtype.
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_loop import run  # noqa: E402

fixture, out, mode, accum, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
dtype = torch.bfloat16 if sys.argv[6:] == ["bf16"] else torch.float32
torch.manual_seed(1234)
torch.use_deterministic_algorithms(True)

with open(os.path.join(fixture, "config.json")) as f:
    qwen3 = json.load(f)["model_type"] == "qwen3_vl"
model = AutoModelForImageTextToText.from_pretrained(fixture, dtype=dtype)
ref = load_file(os.path.join(fixture, "reference.safetensors"))


def inputs(name):
    kw = {"input_ids": ref[f"{name}.input_ids"], "position_ids": ref[f"{name}.position_ids"]}
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if f"{name}.{k}" in ref:
            kw[k] = ref[f"{name}.{k}"]
    return kw


LLM_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
if qwen3:
    # Qwen3-VL checkpoints use the run-time names; the DeepStack mergers project too.
    hub = lambda n: n
    VISION_TARGETS = r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc[12])"
    PROJECTOR = (".visual.merger.", ".visual.deepstack_merger_list.")
else:
    hub = lambda n: n.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
    VISION_TARGETS = r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"
    PROJECTOR = (".visual.merger.",)

run(
    model,
    mode=mode,
    targets=LLM_TARGETS if mode == "lora" else f"{LLM_TARGETS}|{VISION_TARGETS}",
    accum=accum,
    steps=steps,
    out=out,
    names=["text", "image", "two_images", "video"],
    inputs=inputs,
    labels=lambda n: ref[f"{n}.labels"],
    hub=hub,
    part=lambda n: "projector" if any(m in f".{n}" for m in PROJECTOR) else "vision" if "visual." in n else "llm",
)
