"""Tiny random Phi-3-Vision checkpoint and reference outputs from the Hub's own remote code.

Usage: python phi3v_fixture.py OUT_DIR HUB_DATA_DIR [HUB_CODE_DIR]

transformers 5 has no Phi-3-V class, so the oracle is Microsoft's `modeling_phi3_v.py` and
friends, run under transformers 4.45.2 (installed by scripts/setup.sh into
$LMMS_FT_PHI3V_PYTHONPATH, put in front of the venv's packages here). The Hub code is not part
of this repository: it is read from HUB_CODE_DIR (default: $LMMS_FT_PHI3V_HUB_CODE, else
../shared/hf-configs/microsoft--Phi-3-vision-128k-instruct beside the checkout; see
phi3v_hub.py).
HUB_DATA_DIR holds the real config.json / tokenizer files (tests/data/hub/microsoft--...).

The tiny model keeps the real config's structure (su RoPE with short/long factors, HD
transform `sub_glb`, two-layer projector, fused qkv / gate_up projections) with small sizes:
text hidden 32 (4 heads, 2 KV heads, head_dim 8, so the su factors are the real 48-entry lists
taken at stride 12), `original_max_position_embeddings` 512 so that image samples run on the
long factors and text on the short ones, and a 2-layer CLIP of hidden 32 in place of the Hub's
hard-coded ViT-L/14-336 (`image_embedding_phi3_v.CLIP_VIT_LARGE_PATCH14_336_CONFIG`, replaced
before the model is built; described in `img_processor.clip_config`, which the Hub code
ignores). Weights are rounded to bf16 and saved in bf16 (small files; fp32 compute on both
sides sees the same values); embedding rows of tokens no sample uses are zero (they are never
read, and zeros compress in git).

Writes OUT_DIR/{config.json, preprocessor_config.json, model.safetensors, image_*.png,
reference.safetensors, reference.json}. The references are digests, not whole tensors, to keep
the repository small: pixel values as per-crop sums plus values at fixed random indices, logits
as full rows at two positions plus fixed vocabulary columns at every position plus the
log-sum-exp of every position.
"""

import json
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import phi3v_hub  # noqa: E402

out, data_dir = sys.argv[1], sys.argv[2]
pkg_root, hub = phi3v_hub.load(sys.argv[3] if len(sys.argv) > 3 else None)
os.makedirs(out, exist_ok=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

Phi3VConfig = hub["configuration"].Phi3VConfig
Phi3VImageProcessor = hub["image_processing"].Phi3VImageProcessor
Phi3VForCausalLM = hub["modeling"].Phi3VForCausalLM
Phi3VProcessor = hub["processing"].Phi3VProcessor

torch.manual_seed(0)
real = json.load(open(os.path.join(data_dir, "config.json")))

# Parameter count of the real 128k config, on the meta device, with the real tower.
real_cfg = dict(real, _attn_implementation="eager")
with torch.device("meta"):
    real_count = sum(p.numel() for p in Phi3VForCausalLM(Phi3VConfig(**real_cfg)).parameters())

clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            num_channels=3, projection_dim=32, attention_dropout=0.0, dropout=0.0)
phi3v_hub.set_tower(hub["embedding"], clip)
cfg = json.loads(json.dumps(real))
cfg.pop("_name_or_path", None)
cfg.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=16384, original_max_position_embeddings=512,
           sliding_window=16384, _attn_implementation="eager", torch_dtype="bfloat16")
cfg["rope_scaling"] = {"type": "su", "short_factor": real["rope_scaling"]["short_factor"][::12],
                       "long_factor": real["rope_scaling"]["long_factor"][::12]}
cfg["img_processor"] = dict(real["img_processor"], image_dim_out=32, clip_config=clip)
config = Phi3VConfig(**cfg)
model = Phi3VForCausalLM(config).float().eval()

tokenizer = AutoTokenizer.from_pretrained(data_dir)
image_processor = Phi3VImageProcessor(num_crops=4, num_img_tokens=144)
processor = Phi3VProcessor(image_processor, tokenizer)


def smooth_image(w, h, seed, noise=6.0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [127.5 + 120 * np.sin(x / rng.uniform(5, 40) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(5, 40))
             for _ in range(3)]
    arr = np.stack(chans, -1) + rng.normal(0, noise, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# image_a: wide (2x2 crops after an upscale); image_b: tall (3x1 crops after transposing);
# image_large: larger than the 672-pixel HD canvas (a downscale), square enough for all 4 crops.
images = {"a": smooth_image(60, 40, 1), "b": smooth_image(30, 90, 2), "large": smooth_image(720, 700, 3, noise=0.0)}
for key, im in images.items():
    im.save(os.path.join(out, f"image_{key}.png"))


def text(t):
    return {"type": "text", "text": t}


IMG = {"type": "image"}
samples = {
    "text": ([{"role": "system", "content": [text("Be terse.")]},
              {"role": "user", "content": [text("What is 2+2?")]},
              {"role": "assistant", "content": [text("4.")]},
              {"role": "user", "content": [text("And 3+3?")]},
              {"role": "assistant", "content": [text("6, of course.")]}], []),
    "image": ([{"role": "user", "content": [IMG, text("Describe it.")]},
               {"role": "assistant", "content": [text("Waves.")]}], ["a"]),
    "large": ([{"role": "user", "content": [IMG, text("What is here?")]},
               {"role": "assistant", "content": [text("A pattern.")]}], ["large"]),
    "two_images": ([{"role": "user", "content": [IMG, text("First?")]},
                    {"role": "assistant", "content": [text("Red.")]},
                    {"role": "user", "content": [text("And "), IMG, text("this one?")]},
                    {"role": "assistant", "content": [text("Blue.")]}], ["a", "b"]),
}
BATCH = ["two_images", "text", "large"]
GENERATE, MAX_NEW = ["text", "image", "two_images"], 3


def hub_messages(messages):
    """Part lists as the Hub template's string contents, images numbered from 1 per sample."""
    k, result = 0, []
    for m in messages:
        content = ""
        for part in m["content"]:
            if part["type"] == "image":
                k += 1
                # lmms-ft's template writes the Hub prompt format's newline after each image.
                content += f"<|image_{k}|>\n"
            else:
                content += part["text"]
        result.append({"role": m["role"], "content": content})
    return result


PATTERN = r"<\|image_\d+\|>"
added = set(tokenizer.added_tokens_decoder.keys())


def rule_labels(rendered, ids, messages):
    """The project's label rule, applied independently of lmms-ft: tokens overlapping an
    assistant content, then the added tokens right after it. Chunks between image tags are
    tokenised as the Hub processor does (each with BOS), giving each token its offsets."""
    chunks, starts, pos = re.split(PATTERN, rendered), [], 0
    for c in chunks:
        starts.append(rendered.index(c, pos) if c else pos)
        pos = starts[-1] + len(c)
        tag = re.match(PATTERN, rendered[pos:])
        pos += tag.end() if tag else 0
    tokens = []  # (id, start, end) with None offsets for media
    tags = re.findall(PATTERN, rendered)
    for i, (c, s) in enumerate(zip(chunks, starts)):
        enc = tokenizer(c, return_offsets_mapping=True)
        tokens += [(t, s + a, s + b) for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
        if i < len(tags):
            n = int(tags[i].split("_")[1].rstrip("|>"))
            while len(tokens) < len(ids) and ids[len(tokens)] == -n:
                tokens.append((-n, None, None))
    assert [t for t, _, _ in tokens] == ids, "chunked tokenisation differs from the processor"
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        head = "<|assistant|>\n" + m["content"]
        start = rendered.index(head, cursor) + len("<|assistant|>\n")
        spans.append((start, start + len(m["content"])))
        cursor = start + len(m["content"])
    labels = [-100] * len(ids)
    for s_, e_ in spans:
        last = None
        for i, (t, a, b) in enumerate(tokens):
            if t >= 0 and a is not None and a < e_ and b > s_ and b > a:
                labels[i] = t
                last = i
        nxt = last + 1
        while nxt < len(ids) and ids[nxt] in added:
            labels[nxt] = ids[nxt]
            nxt += 1
    return labels


# Inputs of every sample, then the embedding rows they use stay random and the rest are zero.
inputs = {}
for name, (messages, keys) in samples.items():
    msgs = hub_messages(messages)
    rendered = tokenizer.apply_chat_template(msgs, tokenize=False)
    ims = [images[k] for k in keys]
    batch = processor(rendered, ims or None, return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    inputs[name] = (rendered, batch, rule_labels(rendered, ids, msgs), msgs)
used = sorted({t for _, b, _, _ in inputs.values() for t in b["input_ids"][0].tolist() if t >= 0})

gen = torch.Generator().manual_seed(1)
with torch.no_grad():
    for n, p in model.named_parameters():
        randn = torch.randn(p.shape, generator=gen)
        if re.search(r"(norm|layrnorm|layer_norm\d?)\.weight$", n):
            p.copy_(1 + 0.1 * randn)
        elif n.endswith("bias"):
            p.copy_(0.02 * randn)
        elif n.endswith(("embed_tokens.weight", "lm_head.weight", "_GN", "class_embedding")):
            p.copy_(0.5 * randn)
        elif n.endswith("patch_embedding.weight"):
            p.copy_(0.05 * randn)
        else:
            p.copy_(0.1 * randn)
    emb = model.model.embed_tokens.weight
    keep = torch.zeros(emb.shape[0], dtype=torch.bool)
    keep[used] = True
    emb[~keep] = 0
    for p in model.parameters():
        p.copy_(p.bfloat16().float())
# The image embedding shares `wte` with `model.embed_tokens`; the checkpoint holds it once.
state = {k: v.detach().bfloat16().contiguous() for k, v in model.state_dict().items()
         if k != "model.vision_embed_tokens.wte.weight"}
save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
config.to_json_file(os.path.join(out, "config.json"))
saved = json.load(open(os.path.join(out, "config.json")))
saved["auto_map"] = real["auto_map"]
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(saved, f, indent=2, sort_keys=True)
pre = json.load(open(os.path.join(data_dir, "preprocessor_config.json")))
pre["num_crops"] = 4
with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
    json.dump(pre, f, indent=2)

TRACK = ["model.vision_embed_tokens.img_projection.0.weight", "model.vision_embed_tokens.img_projection.2.weight",
         "model.vision_embed_tokens.glb_GN", "model.vision_embed_tokens.sub_GN",
         "model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight",
         "model.layers.0.self_attn.o_proj.weight", "model.norm.weight",
         "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.self_attn.q_proj.weight",
         "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight",
         "model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight"]
params = dict(model.named_parameters())
vocab_cols = torch.randperm(config.vocab_size, generator=gen)[:32].sort().values
tensors, meta = {"logit_columns": vocab_cols}, {"samples": {}, "real_num_parameters": real_count,
                                                 "num_parameters": sum(p.numel() for p in model.parameters())}


def forward(batch, labels):
    kw = {"input_ids": batch["input_ids"].clone()}
    if labels is not None:
        kw["labels"] = labels
    if "pixel_values" in batch:
        kw.update(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    return model(**kw)


sums = {}
for name, (rendered, batch, rule, msgs) in inputs.items():
    ids = batch["input_ids"]
    # Model-level labels: every text token (media tokens, negative ids, carry none).
    labels = torch.where(ids >= 0, ids, torch.full_like(ids, -100))
    model.zero_grad()
    result = forward(batch, labels)
    result.loss.backward()
    logits = result.logits.detach()[0]
    with torch.no_grad():
        rule_loss = float(forward(batch, torch.tensor([rule])).loss)
    n_labels = int((labels[0, 1:] != -100).sum())
    sums[name] = (n_labels, float(result.loss) * n_labels)
    first_media = int((ids[0] < 0).nonzero()[0, 0]) if (ids < 0).any() else 0
    full_rows = torch.tensor([first_media, ids.shape[1] - 1])
    tensors.update({
        f"{name}.input_ids": ids.contiguous(),
        f"{name}.labels": labels.contiguous(),
        f"{name}.rule_labels": torch.tensor([rule]),
        f"{name}.logit_rows": full_rows,
        f"{name}.logits_full": logits[full_rows].contiguous(),
        f"{name}.logits_cols": logits[:, vocab_cols].contiguous(),
        f"{name}.logits_lse": torch.logsumexp(logits, -1).contiguous(),
    })
    if "pixel_values" in batch:
        pv = batch["pixel_values"]
        flat = pv.flatten(1)
        idx = torch.randint(0, flat.shape[1], (4096,), generator=gen)
        tensors.update({
            f"{name}.image_sizes": batch["image_sizes"].long().contiguous(),
            f"{name}.pixel_shape": torch.tensor(list(pv.shape)),
            f"{name}.pixel_sums": pv.double().sum((2, 3, 4)).contiguous(),
            f"{name}.pixel_sq_sums": (pv.double() ** 2).sum((2, 3, 4)).contiguous(),
            f"{name}.pixel_index": idx,
            f"{name}.pixel_sample": flat[:, idx].contiguous(),
        })
    for p in TRACK:
        if params[p].grad is not None:
            tensors[f"{name}.grad.{p}"] = params[p].grad.detach().clone().contiguous()
    meta["samples"][name] = {"loss": float(result.loss), "rule_loss": rule_loss, "text": rendered,
                             "messages": samples[name][0], "images": [f"image_{k}.png" for k in samples[name][1]]}

# A batch of three: the Hub code runs one sample at a time (its su RoPE picks short or long
# factors by the longest position of the whole call, and its image embedding walks one flat
# list of images), so the batch's reference is the per-sample oracle: summed token losses over
# all labels of the batch, one backward.
model.zero_grad()
total_loss, total_n = 0.0, 0
loss = 0
for name in BATCH:
    _, batch, _, _ = inputs[name]
    ids = batch["input_ids"]
    labels = torch.where(ids >= 0, ids, torch.full_like(ids, -100))
    n = int((labels[0, 1:] != -100).sum())
    loss = loss + forward(batch, labels).loss * n
    total_n += n
loss = loss / total_n
loss.backward()
for p in TRACK:
    if params[p].grad is not None:
        tensors[f"batch.grad.{p}"] = params[p].grad.detach().clone().contiguous()
meta["batch"] = {"samples": BATCH, "loss": float(loss)}

# Greedy generation from the prompts (each conversation without its final answer): the Hub's
# `generate` needs cache APIs transformers removed, so this is the plain loop, one full
# forward per new token, stopping at <|end|> / <|endoftext|>.
STOP = {tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")}
with torch.no_grad():
    for name in GENERATE:
        messages, keys = samples[name]
        prompt = tokenizer.apply_chat_template(hub_messages(messages[:-1]), tokenize=False,
                                               add_generation_prompt=True)
        batch = processor(prompt, [images[k] for k in keys] or None, return_tensors="pt")
        ids, new, steps = batch["input_ids"], [], []
        for _ in range(MAX_NEW):
            step = dict(batch, input_ids=torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1))
            logits = forward(step, None).logits[0, -1]
            steps.append(logits)
            new.append(int(logits.argmax()))
            if new[-1] in STOP:
                break
        tensors[f"{name}.prompt_ids"] = ids[0].contiguous()
        tensors[f"{name}.generated"] = torch.tensor(new)
        tensors[f"{name}.generated_logits"] = torch.stack(steps).contiguous()
meta["max_new_tokens"] = MAX_NEW
save_file(tensors, os.path.join(out, "reference.safetensors"))
with open(os.path.join(out, "reference.json"), "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
print(json.dumps({"num_parameters": meta["num_parameters"], "real_num_parameters": real_count}))
shutil.rmtree(pkg_root, ignore_errors=True)
