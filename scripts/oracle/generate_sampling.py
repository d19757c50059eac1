"""Next-token distributions after transformers' sampling warpers, for lmms-ft's sampling test.

Usage: python generate_sampling.py CASES_JSON

CASES_JSON: {"logits": [...], "cases": [{"temperature": T, "top_k": K, "top_p": P}, ...]}.
Each case applies the warpers `generate(do_sample=True)` builds, in its order
(TemperatureLogitsWarper, TopKLogitsWarper when K > 0, TopPLogitsWarper when P < 1), then a
softmax. Prints one JSON line: the probability vector per case.
"""

import json
import sys

import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

spec = json.loads(sys.argv[1])
logits = torch.tensor([spec["logits"]], dtype=torch.float32)
ids = torch.zeros((1, 1), dtype=torch.long)
out = []
for c in spec["cases"]:
    scores = TemperatureLogitsWarper(c["temperature"])(ids, logits.clone())
    if c["top_k"] > 0:
        scores = TopKLogitsWarper(c["top_k"])(ids, scores)
    if c["top_p"] < 1.0:
        scores = TopPLogitsWarper(c["top_p"])(ids, scores)
    out.append(torch.softmax(scores, dim=-1)[0].tolist())
print(json.dumps(out))
