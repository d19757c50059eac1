"""The reference training loop the families' training oracles share (train_qwen_vl.py,
train_mllama.py): transformers + peft + a plain PyTorch AdamW loop.

Step s uses micro-batches (s*ACCUM + j) % len(names), j < ACCUM, each of batch size 1. The
loss of a step is the summed token cross-entropy of all its micro-batches divided by their
total label tokens; each micro-batch back-propagates its sum divided by that total, so the
gradient is the mean over all label tokens of the step.

lora: LoRA (r=4, alpha=8, rsLoRA off, dropout 0) on the modules `targets` matches (a regex
over transformers' runtime names); the projector trains fully at its own lr; everything else
is frozen. The initial adapter has random non-zero lora_A and lora_B and is written to
OUT_DIR/init_adapter (PEFT layout) for the other side to load.
full: every parameter trains; vision, projector and LLM each have their own lr.

All: AdamW(betas 0.9/0.999, eps 1e-8, weight decay 0.1 except norms and biases), cosine
schedule with 2 warm-up steps (transformers' get_cosine_schedule_with_warmup), gradient
clipping at norm 1.0. Writes OUT_DIR/result.json (per-step loss, lr, grad norm) and
OUT_DIR/final.safetensors (trainable tensors after the last step, Hub / adapter names), and
prints the result as one JSON line.
"""

import json
import os

import torch
from safetensors.torch import save_file
from transformers import get_cosine_schedule_with_warmup

LR, VISION_LR, PROJ_LR, WD = 1e-3, 2e-3, 5e-4, 0.1


def label_count(labels):
    return int((labels[:, 1:] != -100).sum())


def loss_sum(logits, labels):
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def is_norm_or_bias(module, param_name):
    # Decided by module type, independent of the tensor rank rule lmms-ft applies.
    return param_name.endswith("bias") or "Norm" in type(module).__name__


def run(model, *, mode, targets, accum, steps, out, names, inputs, labels, hub, part):
    """`inputs(name)` gives the forward kwargs and `labels(name)` the labels of a sample;
    `hub(runtime_name)` the Hub name of a parameter; `part(runtime_name)` its component
    ("vision", "projector" or "llm")."""
    os.makedirs(out, exist_ok=True)
    model.train()
    if mode.startswith("lora"):
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_A" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                elif "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(os.path.join(out, "init_adapter"))
        base = model.base_model.model
        for n, p in base.named_parameters():
            if part(n) == "projector":
                p.requires_grad_(True)
    else:
        base = model

    groups = {"vision": ([], []), "projector": ([], []), "llm": ([], [])}
    lrs = {"vision": VISION_LR, "projector": PROJ_LR, "llm": LR}
    tracked = {}
    seen = set()  # tied embeddings: lm_head.weight is embed_tokens.weight, trained once
    for mname, module in base.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            decay = not is_norm_or_bias(module, pname)
            groups[part(full)][0 if decay else 1].append(p)
            tracked[hub(full.replace(".default", ""))] = p
    param_groups = []
    for name, (decay, no_decay) in groups.items():
        if decay:
            param_groups.append({"params": decay, "lr": lrs[name], "weight_decay": WD})
        if no_decay:
            param_groups.append({"params": no_decay, "lr": lrs[name], "weight_decay": 0.0})
    opt = torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    base_lrs = [g["lr"] for g in param_groups]
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=steps)

    result = {"loss": [], "lr": [], "grad_norm": [], "trainable": sum(p.numel() for p in tracked.values())}
    params = [p for g in param_groups for p in g["params"]]
    for s in range(steps):
        micro = [names[(s * accum + j) % len(names)] for j in range(accum)]
        total = sum(label_count(labels(n)) for n in micro)
        step_loss = 0.0
        for n in micro:
            logits = model(**inputs(n)).logits
            ls = loss_sum(logits, labels(n))
            (ls / total).backward()
            step_loss += ls.item()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        result["loss"].append(step_loss / total)
        result["lr"].append(sched.get_last_lr()[0] / base_lrs[0] * LR)
        result["grad_norm"].append(float(norm))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    save_file({k: v.detach().contiguous() for k, v in tracked.items()}, os.path.join(out, "final.safetensors"))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
