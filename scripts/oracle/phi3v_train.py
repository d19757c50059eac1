"""Reference LoRA run on the Phi-3-V fixture: the Hub remote code + peft + a plain AdamW loop.

Usage: python phi3v_train.py FIXTURE_DIR OUT_DIR ACCUM STEPS [HUB_CODE_DIR]

The protocol of train_qwen_vl.py (see its docstring and core::testing::train_parity), mode
`lora`: LoRA (r=4, alpha=8, dropout 0) on the Phi-3 decoder's fused linears (`qkv_proj`,
`o_proj`, `gate_up_proj`, `down_proj`, the Hub's module names, which peft sees at run time),
the image projector and the `glb_GN` / `sub_GN` separators trained fully at their own lr, the
CLIP tower frozen; the initial adapter has random non-zero lora_A / lora_B and is written to
OUT_DIR/init_adapter. The fixture's four samples are rebuilt with the Hub processor from its
images and rendered texts (their ids must equal the committed ones); each is a batch of one
with every text token labeled. Step s uses samples (s*ACCUM + j) % 4, j < ACCUM.

Also writes, for the interop check, the logits digests of every sample under the initial
adapter (`init_logits.safetensors`: log-sum-exp at every position and the fixture's columns).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import phi3v_hub  # noqa: E402

fixture, out, accum, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pkg_root, hub = phi3v_hub.load(sys.argv[5] if len(sys.argv) > 5 else None)
os.makedirs(out, exist_ok=True)

import shutil  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoTokenizer, get_cosine_schedule_with_warmup  # noqa: E402

torch.manual_seed(1234)
torch.use_deterministic_algorithms(True)
cfg = json.load(open(os.path.join(fixture, "config.json")))
phi3v_hub.set_tower(hub["embedding"], cfg["img_processor"]["clip_config"])
model = hub["modeling"].Phi3VForCausalLM.from_pretrained(fixture, torch_dtype=torch.float32,
                                                        attn_implementation="eager")
model.train()
ref = load_file(os.path.join(fixture, "reference.safetensors"))
meta = json.load(open(os.path.join(fixture, "reference.json")))
tokenizer = AutoTokenizer.from_pretrained(fixture)
processor = hub["processing"].Phi3VProcessor(
    hub["image_processing"].Phi3VImageProcessor(num_crops=4, num_img_tokens=144), tokenizer)
names = ["text", "image", "large", "two_images"]
inputs = {}
for n in names:
    s = meta["samples"][n]
    ims = [Image.open(os.path.join(fixture, f)).convert("RGB") for f in s["images"]]
    b = processor(s["text"], ims or None, return_tensors="pt")
    assert torch.equal(b["input_ids"], ref[f"{n}.input_ids"]), n
    inputs[n] = b

LR, VISION_LR, PROJ_LR, WD = 1e-3, 2e-3, 5e-4, 0.1
PROJECTOR = (".vision_embed_tokens.img_projection.", ".vision_embed_tokens.glb_GN", ".vision_embed_tokens.sub_GN")


def forward(n):
    b = inputs[n]
    kw = {"input_ids": b["input_ids"].clone()}
    if "pixel_values" in b:
        kw.update(pixel_values=b["pixel_values"], image_sizes=b["image_sizes"])
    return model(**kw).logits


def loss_sum(logits, labels):
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


from peft import LoraConfig, get_peft_model  # noqa: E402

targets = r"model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)"
model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
g = torch.Generator().manual_seed(7)
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif "lora_B" in n:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
model.save_pretrained(os.path.join(out, "init_adapter"))
cols = ref["logit_columns"]
init = {}
with torch.no_grad():
    for n in names:
        logits = forward(n)[0]
        init[f"{n}.logits_lse"] = torch.logsumexp(logits, -1).contiguous()
        init[f"{n}.logits_cols"] = logits[:, cols].contiguous()
save_file(init, os.path.join(out, "init_logits.safetensors"))
for n, p in model.named_parameters():
    if any(m in n for m in PROJECTOR):
        p.requires_grad_(True)
base = model.base_model.model

groups = {"vision": ([], []), "projector": ([], []), "llm": ([], [])}
lrs = {"vision": VISION_LR, "projector": PROJ_LR, "llm": LR}
tracked, seen = {}, set()
for mname, module in base.named_modules():
    for pname, p in module.named_parameters(recurse=False):
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        full = f"{mname}.{pname}" if mname else pname
        part = "projector" if any(m in f".{full}" for m in PROJECTOR) else \
            "vision" if ".img_processor." in full else "llm"
        decay = not (pname.endswith("bias") or "Norm" in type(module).__name__)
        groups[part][0 if decay else 1].append(p)
        tracked[full.replace(".default", "")] = p
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
    total = sum(int((ref[f"{n}.labels"][:, 1:] != -100).sum()) for n in micro)
    step_loss = 0.0
    for n in micro:
        ls = loss_sum(forward(n), ref[f"{n}.labels"])
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
shutil.rmtree(pkg_root, ignore_errors=True)
