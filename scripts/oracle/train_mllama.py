"""Reference training run for Llama-3.2-Vision: transformers + peft + a plain PyTorch AdamW
loop (the loop and its hyper-parameters are train_loop.py's).

Usage: python train_mllama.py FIXTURE_DIR OUT_DIR {lora|lora_vision} ACCUM STEPS

FIXTURE_DIR is made by mllama_fixture.py (checkpoint + reference.safetensors with the
processed inputs of the samples text, image, tiles, two_images). LoRA goes on every
self-attention, cross-attention and MLP linear of the language model (not lm_head); the
multi-modal projector trains fully; the vision model is frozen. lora_vision: the same, plus
LoRA on every linear of the local and global vision encoder layers at the vision lr.
"""

import os
import sys

import torch
from safetensors.torch import load_file
from transformers import MllamaForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_loop import run  # noqa: E402

fixture, out, mode, accum, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
assert mode in ("lora", "lora_vision"), mode
torch.manual_seed(1234)
torch.use_deterministic_algorithms(True)

model = MllamaForConditionalGeneration.from_pretrained(fixture, dtype=torch.float32)
ref = load_file(os.path.join(fixture, "reference.safetensors"))
KEYS = ("input_ids", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


def hub(n):
    for runtime, name in (("model.language_model.", "language_model.model."), ("lm_head", "language_model.lm_head"),
                          ("model.vision_model.", "vision_model."), ("model.multi_modal_projector", "multi_modal_projector")):
        if n.startswith(runtime):
            return name + n[len(runtime):]
    return n


LLM_TARGETS = r"model\.language_model\.layers\.\d+\.((self|cross)_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
VISION_TARGETS = r"model\.vision_model\.(transformer|global_transformer)\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.fc[12])"
run(
    model,
    mode=mode,
    targets=LLM_TARGETS if mode == "lora" else f"{LLM_TARGETS}|{VISION_TARGETS}",
    accum=accum,
    steps=steps,
    out=out,
    names=["text", "image", "tiles", "two_images"],
    inputs=lambda n: {k: ref[f"{n}.{k}"] for k in KEYS if f"{n}.{k}" in ref},
    labels=lambda n: ref[f"{n}.labels"],
    hub=hub,
    part=lambda n: "projector" if "multi_modal_projector" in n else "vision" if "vision_model" in n else "llm",
)
