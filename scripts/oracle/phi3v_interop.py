"""Loads an lmms-ft output with the Hub's remote code and reports its loss on a fixture sample.

Usage: python phi3v_interop.py FIXTURE MODEL_DIR SAMPLE [ADAPTER_DIR] [HUB_CODE_DIR]

MODEL_DIR (a full fine-tune or a merge-lora output) is loaded the way users load it,
`AutoModelForCausalLM.from_pretrained(MODEL_DIR, trust_remote_code=True)`, so it must carry the
remote-code files and `auto_map`; with ADAPTER_DIR, `PeftModel.from_pretrained` puts an lmms-ft
LoRA adapter on it (a missing adapter key is an error). The tiny fixture's tower replaces the
Hub's hard-coded ViT-L in the loaded module first. Prints {"loss": ...}: the mean token loss of
SAMPLE (rendered text and images from FIXTURE/reference.json) under its rule labels.
"""

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import phi3v_hub  # noqa: E402

fixture, model_dir, sample = sys.argv[1], sys.argv[2], sys.argv[3]
adapter = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None
pkg_root, hub = phi3v_hub.load(sys.argv[5] if len(sys.argv) > 5 else None)

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig  # noqa: E402
from transformers.dynamic_module_utils import get_class_from_dynamic_module  # noqa: E402

cfg = json.load(open(os.path.join(model_dir, "config.json")))
emb = get_class_from_dynamic_module("image_embedding_phi3_v.Phi3ImageEmbedding", model_dir)
sys.modules[emb.__module__].CLIP_VIT_LARGE_PATCH14_336_CONFIG = CLIPVisionConfig(**cfg["img_processor"]["clip_config"])
model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, torch_dtype=torch.float32,
                                             attn_implementation="eager").eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
if adapter:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        model = PeftModel.from_pretrained(model, adapter).eval()
meta = json.load(open(os.path.join(fixture, "reference.json")))["samples"][sample]
ref = load_file(os.path.join(fixture, "reference.safetensors"))
tokenizer = AutoTokenizer.from_pretrained(model_dir)
processor = hub["processing"].Phi3VProcessor(
    hub["image_processing"].Phi3VImageProcessor(num_crops=4, num_img_tokens=144), tokenizer)
ims = [Image.open(os.path.join(fixture, f)).convert("RGB") for f in meta["images"]]
b = processor(meta["text"], ims or None, return_tensors="pt")
assert torch.equal(b["input_ids"], ref[f"{sample}.input_ids"])
kw = {"input_ids": b["input_ids"].clone(), "labels": ref[f"{sample}.rule_labels"]}
if ims:
    kw.update(pixel_values=b["pixel_values"], image_sizes=b["image_sizes"])
with torch.no_grad():
    loss = float(model(**kw).loss)
print(json.dumps({"loss": loss}))
