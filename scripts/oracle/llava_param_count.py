"""Parameter counts transformers 5.23 reports for LLaVA-family config.json files.

Usage: python llava_param_count.py MODEL_DIR...

Reads each directory's config.json as `from_pretrained` does, builds the model on the meta
device (no memory) with the class its `model_type` names and prints one JSON object mapping
each directory to `sum(p.numel() for p in model.parameters())`.
"""

import json
import sys

import torch
from transformers import (
    AutoConfig,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)

classes = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "llava_next_video": LlavaNextVideoForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
}
counts = {}
for path in sys.argv[1:]:
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = classes[config.model_type](config)
    counts[path] = sum(p.numel() for p in model.parameters())
print(json.dumps(counts))
