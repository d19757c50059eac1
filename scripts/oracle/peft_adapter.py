"""A LoRA adapter written by `peft` itself for a fixture checkpoint, and the merged model.

Usage: python peft_adapter.py FIXTURE_DIR OUT_DIR

Loads the checkpoint in FIXTURE_DIR with transformers, wraps it with peft (r = 4, alpha = 8,
on the text model's q/v projections and the projector's first layer; `init_lora_weights =
False` so lora_B is random and the adapter changes the model), and writes:

- OUT_DIR/adapter        `save_pretrained`'s adapter (transformers 5 runtime key layout,
                         `base_model.model.model.language_model.layers.*`);
- OUT_DIR/adapter_old    the same tensors keyed as older tools wrote them for the text model
                         (`base_model.model.model.layers.*`, the original LLaVA / transformers
                         4 layout) and the projector as `base_model.model.multi_modal_projector`;
- OUT_DIR/merged         `merge_and_unload()` saved with `save_pretrained`, plus the fixture's
                         tokenizer, processor and template files.
"""

import os
import shutil
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

fixture, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = AutoModelForImageTextToText.from_pretrained(fixture, dtype=torch.float32).eval()
config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                    target_modules=r".*language_model.*\.(q_proj|v_proj)|.*multi_modal_projector\.linear_1")
peft_model = get_peft_model(model, config)
adapter = os.path.join(out, "adapter")
peft_model.save_pretrained(adapter)

old = os.path.join(out, "adapter_old")
os.makedirs(old, exist_ok=True)
tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
renamed = {}
for key, value in tensors.items():
    key = key.replace("base_model.model.model.language_model.", "base_model.model.model.")
    key = key.replace("base_model.model.model.multi_modal_projector.", "base_model.model.multi_modal_projector.")
    renamed[key] = value
assert any(k.startswith("base_model.model.model.layers.") for k in renamed), sorted(renamed)
save_file(renamed, os.path.join(old, "adapter_model.safetensors"), metadata={"format": "pt"})
shutil.copy(os.path.join(adapter, "adapter_config.json"), old)

merged = os.path.join(out, "merged")
peft_model.merge_and_unload().save_pretrained(merged)
for name in os.listdir(fixture):
    path = os.path.join(fixture, name)
    keep = not name.endswith(".safetensors") and name not in ("config.json", "generation_config.json")
    if os.path.isfile(path) and keep and not os.path.exists(os.path.join(merged, name)):
        shutil.copy(path, merged)
print(sorted(tensors)[:3])
