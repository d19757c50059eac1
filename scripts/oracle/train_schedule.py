"""Learning-rate multipliers from transformers' schedulers, for lmms-ft's schedule test.

Usage: python train_schedule.py CASES_JSON

CASES_JSON is a list of {"kind": "cosine"|"linear"|"constant", "total": N, "warmup_ratio": R}.
Warm-up steps come from the ratio the way `TrainingArguments.get_warmup_steps` does (in
transformers 5 a `warmup_steps` below 1 is the ratio: `math.ceil(total * ratio)`); the scheduler is built with `transformers.get_scheduler` on a
one-parameter AdamW at lr 1.0, and the lr of each of the `total` optimiser steps is read
before that step's `scheduler.step()`, as the HF Trainer applies it. Prints one JSON line:
per case, {"warmup": W, "lr": [...]}.
"""

import json
import math
import sys

import torch
from transformers import TrainingArguments, get_scheduler

cases = json.loads(sys.argv[1])
out = []
for c in cases:
    assert 0 <= c["warmup_ratio"] < 1, c
    args = TrainingArguments(output_dir="/tmp/unused", warmup_steps=c["warmup_ratio"], report_to=[])
    warmup = args.get_warmup_steps(c["total"])
    assert warmup == math.ceil(c["total"] * c["warmup_ratio"]), (warmup, c)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(c["kind"] if c["kind"] != "constant" else "constant_with_warmup", opt,
                          num_warmup_steps=warmup, num_training_steps=c["total"])
    lrs = []
    for _ in range(c["total"]):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    out.append({"warmup": warmup, "lr": lrs})
print(json.dumps(out))
