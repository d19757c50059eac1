"""Reference training run: transformers + peft + a plain PyTorch AdamW loop.

Usage: python train_qwen_vl.py FIXTURE_DIR OUT_DIR {lora|lora_vision|full} ACCUM STEPS [bf16]

FIXTURE_DIR is made by qwen2_vl_fixture.py or qwen3_vl_fixture.py (checkpoint +
reference.safetensors with the processed inputs of four samples); the family (Qwen2-VL /
Qwen2.5-VL or Qwen3-VL) comes from its config.json and decides the module names below.
Step s uses micro-batches (s*ACCUM + j) % 4, j < ACCUM, each of batch size 1. The loss of a
step is the summed token cross-entropy of all its micro-batches divided by their total label
tokens; each micro-batch back-propagates its sum divided by that total, so the gradient is
the mean over all label tokens of the step.

lora: LoRA (r=4, alpha=8, rsLoRA off, dropout 0) on every linear layer of the language
model except lm_head; the merger (projector; Qwen3-VL: with the DeepStack mergers) trains
fully at its own lr; the vision blocks are frozen. lora_vision: the same, plus LoRA on every
linear of the vision blocks (attn.qkv, attn.proj and the MLP's two) at the vision lr. The
initial adapter has random non-zero lora_A and lora_B and is written to OUT_DIR/init_adapter
(PEFT layout) for the other side to load.
full: every parameter trains; vision, merger and LLM each have their own lr.

bf16: the model is loaded in bf16 (weights, norms and compute); peft keeps the LoRA
parameters in fp32 (its default `autocast_adapter_dtype`), the loss is taken in fp32, and
torch's AdamW keeps each parameter's state in the parameter's dtype.

All: AdamW(betas 0.9/0.999, eps 1e-8, weight decay 0.1 except norms and biases), cosine
schedule with 2 warm-up steps (transformers' get_cosine_schedule_with_warmup), gradient
clipping at norm 1.0. Writes OUT_DIR/result.json (per-step loss, lr, grad norm) and
OUT_DIR/final.safetensors (trainable tensors after the last step, Hub / adapter names).
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, get_cosine_schedule_with_warmup

fixture, out, mode, accum, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
dtype = torch.bfloat16 if sys.argv[6:] == ["bf16"] else torch.float32
os.makedirs(out, exist_ok=True)
torch.manual_seed(1234)
torch.use_deterministic_algorithms(True)

with open(os.path.join(fixture, "config.json")) as f:
    qwen3 = json.load(f)["model_type"] == "qwen3_vl"
model = AutoModelForImageTextToText.from_pretrained(fixture, dtype=dtype)
model.train()
ref = load_file(os.path.join(fixture, "reference.safetensors"))
names = ["text", "image", "two_images", "video"]

LR, VISION_LR, PROJ_LR, WD = 1e-3, 2e-3, 5e-4, 0.1


def inputs(name):
    kw = {"input_ids": ref[f"{name}.input_ids"], "position_ids": ref[f"{name}.position_ids"]}
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if f"{name}.{k}" in ref:
            kw[k] = ref[f"{name}.{k}"]
    return kw


def label_count(labels):
    return int((labels[:, 1:] != -100).sum())


def loss_sum(logits, labels):
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def is_norm_or_bias(module, param_name):
    # Decided by module type, independent of the tensor rank rule lmms-ft applies.
    return param_name.endswith("bias") or "Norm" in type(module).__name__


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

if mode in ("lora", "lora_vision"):
    from peft import LoraConfig, get_peft_model
    targets = LLM_TARGETS if mode == "lora" else f"{LLM_TARGETS}|{VISION_TARGETS}"
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(os.path.join(out, "init_adapter"))
    for n, p in model.named_parameters():
        if any(m in n for m in PROJECTOR):
            p.requires_grad_(True)
    base = model.base_model.model
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
        part = "projector" if any(m in f".{full}" for m in PROJECTOR) else "vision" if "visual." in full else "llm"
        decay = not is_norm_or_bias(module, pname)
        groups[part][0 if decay else 1].append(p)
        tracked[hub(full.replace(".default", ""))] = p
param_groups = []
for part, (decay, no_decay) in groups.items():
    if decay:
        param_groups.append({"params": decay, "lr": lrs[part], "weight_decay": WD})
    if no_decay:
        param_groups.append({"params": no_decay, "lr": lrs[part], "weight_decay": 0.0})
opt = torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8, foreach=False)
base_lrs = [g["lr"] for g in param_groups]
sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=steps)

result = {"loss": [], "lr": [], "grad_norm": [], "trainable": sum(p.numel() for p in tracked.values())}
params = [p for g in param_groups for p in g["params"]]
for s in range(steps):
    micro = [names[(s * accum + j) % 4] for j in range(accum)]
    total = sum(label_count(ref[f"{n}.labels"]) for n in micro)
    step_loss = 0.0
    for n in micro:
        logits = model(**inputs(n)).logits
        ls = loss_sum(logits, ref[f"{n}.labels"])
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
