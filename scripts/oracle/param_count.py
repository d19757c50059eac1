"""Parameter count transformers reports for a config.json, built on the meta device (no weights).

Usage: python param_count.py CONFIG.json [CONFIG.json ...]  → one JSON line: {path: count}
"""

import json
import sys

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

counts = {}
for path in sys.argv[1:]:
    with open(path) as f:
        raw = json.load(f)
    raw.pop("_comment", None)
    config = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    counts[path] = sum(p.numel() for p in model.parameters())
print(json.dumps(counts))
