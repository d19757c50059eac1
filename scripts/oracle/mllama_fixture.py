"""Tiny random Llama-3.2-Vision (Mllama) checkpoint and reference outputs from pinned transformers.

Usage: python mllama_fixture.py OUT_DIR VARIANT HF_CONFIGS   (VARIANT: "tiny")

Writes into OUT_DIR a checkpoint saved by `save_pretrained` (Hub tensor names), the real
Llama-3 tokenizer (the tiktoken `tokenizer.model` of tests/data/hub converted by transformers'
TikTokenConverter, with the Hub tokenizer_config.json's special tokens and ids, `<|image|>` =
128256) and the Hub chat template, and `reference.safetensors` + `reference.json` holding, for
the samples text-only, one image, a 2x2-tile image, two images over two turns, and a batch of
two samples with different tile counts: the processor's outputs (ids, pixel values, aspect
ratio ids / mask, cross-attention mask), logits, loss and the gradients of named parameters;
then greedy generations with their per-step logits.
"""

import base64
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import processors
from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

out, variant, shared = sys.argv[1], sys.argv[2], sys.argv[3]
assert variant == "tiny", variant
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
np.random.seed(0)
real = os.path.join(shared, "meta-llama--Llama-3.2-11B-Vision-Instruct")
DATE = "26 Jul 2024"


# ---- The Llama-3 tokenizer: tiktoken ranks -> tokenizers BPE, as transformers converts it.
def load_ranks(path):
    # tiktoken's file format: one "base64(token) rank" per line (what tiktoken.load reads).
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


TikTokenConverter.load_tiktoken_bpe = staticmethod(load_ranks)
with open(os.path.join(real, "tokenizer_config.json")) as f:
    tok_config = json.load(f)
added = sorted(((int(i), t) for i, t in tok_config["added_tokens_decoder"].items()))
specials = [t["content"] for _, t in added]
backend = TikTokenConverter(vocab_file=os.path.join(real, "tokenizer.model"), extra_special_tokens=specials).converted()
for i, t in added:
    assert backend.token_to_id(t["content"]) == i, (t, backend.token_to_id(t["content"]))
bos = tok_config["bos_token"]
backend.post_processor = processors.Sequence([
    processors.ByteLevel(trim_offsets=False),
    processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                  special_tokens=[(bos, backend.token_to_id(bos))]),
])
tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=tok_config["eos_token"],
                                    pad_token=tok_config["pad_token"], padding_side="right")
with open(os.path.join(real, "chat_template.json")) as f:
    template = json.load(f)["chat_template"]

# ---- A tiny model with the real vocabulary, llama3 rope scaling and one cross-attention layer.
text = dict(vocab_size=128256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, cross_attention_layers=[1], rms_norm_eps=1e-5, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192},
            max_position_embeddings=131072, pad_token_id=128004, bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
# 28px tiles of 14px patches: 4 patches + class token = 5, padded to 8 inside the encoder.
vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_global_layers=2, attention_heads=2,
              image_size=28, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[0, 2], vision_output_dim=96,
              norm_eps=1e-5)
config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=128256)
model = MllamaForConditionalGeneration(config).float().eval()
# Every gate starts at 0 (or pi/4), which would hide the tiles, positions and cross-attention.
with torch.no_grad():
    for name, p in model.named_parameters():
        if "gate" in name:
            p.copy_(torch.randn_like(p) * 0.8)
model.save_pretrained(out)

image_processor = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4, resample=2,
                                          image_mean=[0.48145466, 0.4578275, 0.40821073],
                                          image_std=[0.26862954, 0.26130258, 0.27577711])
processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
processor.save_pretrained(out)
tokenizer.save_pretrained(out)
with open(os.path.join(out, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "pad_token_id": 128004}, f)


def noise_image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# 28x20 fits one tile unresized (padded only); 50x50 upscales onto 2x2 tiles; 60x30 shrinks
# onto 1x2 tiles; 300x10 fits no canvas and is shrunk onto 1x4.
images = {"a": noise_image(28, 20, 1), "b": noise_image(60, 30, 2), "c": noise_image(50, 50, 3),
          "wide": noise_image(300, 10, 4)}
for k, im in images.items():
    im.save(os.path.join(out, f"image_{k}.png"))

samples = {
    "text": [
        {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "4."}]},
    ],
    "image": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]},
    ],
    "tiles": [
        {"role": "user", "content": [{"type": "text", "text": "How many tiles?"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Four."}]},
    ],
    "two_images": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "First?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "image"}, {"type": "text", "text": "this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
    ],
    "wide": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Wide?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
    ],
}
media = {"text": [], "image": [images["a"]], "tiles": [images["c"]], "two_images": [images["a"], images["b"]],
         "wide": [images["wide"]]}
track = {
    "model.vision_model.patch_embedding.weight": "vision_model.patch_embedding.weight",
    "model.vision_model.transformer.layers.0.self_attn.q_proj.weight": "vision_model.transformer.layers.0.self_attn.q_proj.weight",
    "model.vision_model.global_transformer.layers.1.mlp.fc1.weight": "vision_model.global_transformer.layers.1.mlp.fc1.weight",
    "model.vision_model.gated_positional_embedding.tile_embedding.weight": "vision_model.gated_positional_embedding.tile_embedding.weight",
    "model.multi_modal_projector.weight": "multi_modal_projector.weight",
    "model.language_model.layers.1.cross_attn.k_proj.weight": "language_model.model.layers.1.cross_attn.k_proj.weight",
    "model.language_model.layers.1.cross_attn.q_proj.weight": "language_model.model.layers.1.cross_attn.q_proj.weight",
    "model.language_model.layers.1.cross_attn_attn_gate": "language_model.model.layers.1.cross_attn_attn_gate",
    "model.language_model.layers.0.self_attn.q_proj.weight": "language_model.model.layers.0.self_attn.q_proj.weight",
    "model.language_model.layers.2.mlp.down_proj.weight": "language_model.model.layers.2.mlp.down_proj.weight",
    "model.language_model.norm.weight": "language_model.model.norm.weight",
}
params = dict(model.named_parameters())
IMAGE_ID = config.image_token_index
EOT = tokenizer.convert_tokens_to_ids("<|eot_id|>")
HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def render(messages, **kw):
    return processor.apply_chat_template(messages, tokenize=False, date_string=DATE, **kw)


def encode(names):
    texts = [render(samples[n]) for n in names]
    imgs = [media[n] for n in names]
    kwargs = {"images": imgs} if any(imgs) else {}
    return texts, processor(text=texts, return_tensors="pt", add_special_tokens=False, padding=True, **kwargs)


def rule_labels(name, text_in, ids):
    """The label rule, applied independently of lmms-ft: assistant contents plus the
    <|eot_id|> right after each, located by character offsets in the rendered text."""
    enc = tokenizer(text_in, return_offsets_mapping=True, add_special_tokens=False)
    assert enc["input_ids"] == ids, "the text does not tokenize like the processor"
    spans, cursor = [], 0
    for m in samples[name]:
        if m["role"] != "assistant":
            continue
        content = "".join(p["text"] for p in m["content"])
        start = text_in.index(HEADER + content, cursor) + len(HEADER)
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    rule = [-100] * len(ids)
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if any(a < e and b > s for s, e in spans):
            rule[i] = ids[i]
    for s, e in spans:
        after = next(i for i, (a, _) in enumerate(enc["offset_mapping"]) if a >= e)
        assert ids[after] == EOT
        rule[after] = EOT
    return rule


tensors, meta = {}, {"samples": {}}
for name in ("text", "image", "tiles", "two_images", "wide"):
    (text_in,), batch = encode([name])
    ids = batch["input_ids"]
    rule = torch.tensor([rule_labels(name, text_in, ids[0].tolist())])
    with torch.no_grad():
        rule_loss = float(model(**batch, labels=rule).loss)
    # Labels for the model-level check: every token except the image tokens.
    labels = ids.clone()
    labels[ids == IMAGE_ID] = -100
    model.zero_grad()
    result = model(**batch, labels=labels)
    result.loss.backward()
    for key in ("input_ids", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"):
        if key in batch:
            tensors[f"{name}.{key}"] = batch[key].contiguous()
    tensors[f"{name}.labels"] = labels.contiguous()
    tensors[f"{name}.rule_labels"] = rule.contiguous()
    tensors[f"{name}.logits"] = result.logits.detach().contiguous()
    for p, hub in track.items():
        if params[p].grad is not None:
            tensors[f"{name}.grad.{hub}"] = params[p].grad.detach().clone().contiguous()
    meta["samples"][name] = {"loss": float(result.loss), "rule_loss": rule_loss, "text": text_in,
                             "messages": samples[name], "images": [k for k, v in images.items() for m in media[name] if m is v]}

# A batch of two samples with different lengths and tile counts (1 tile and 2x2), right-padded.
names = ["image", "tiles"]
texts, batch = encode(names)
rules = [rule_labels(n, t, [i for i, m in zip(row.tolist(), mask.tolist()) if m])
         for n, t, row, mask in zip(names, texts, batch["input_ids"], batch["attention_mask"])]
width = batch["input_ids"].shape[1]
rule = torch.tensor([r + [-100] * (width - len(r)) for r in rules])
model.zero_grad()
result = model(**batch, labels=rule)
result.loss.backward()
for key in ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"):
    tensors[f"batch.{key}"] = batch[key].contiguous()
tensors["batch.rule_labels"] = rule.contiguous()
tensors["batch.logits"] = result.logits.detach().contiguous()
for p, hub in track.items():
    if params[p].grad is not None:
        tensors[f"batch.grad.{hub}"] = params[p].grad.detach().clone().contiguous()
meta["batch"] = {"samples": names, "loss": float(result.loss)}

# Greedy generation from the prompts (each conversation without its final answer).
for name in ("text", "image", "tiles", "two_images"):
    prompt = render(samples[name][:-1], add_generation_prompt=True)
    kwargs = {"images": [media[name]]} if media[name] else {}
    batch = processor(text=[prompt], return_tensors="pt", add_special_tokens=False, **kwargs)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                                   output_logits=True)
    tensors[f"{name}.prompt_ids"] = batch["input_ids"][0].contiguous()
    tensors[f"{name}.generated"] = generated.sequences[0, batch["input_ids"].shape[1]:].contiguous()
    tensors[f"{name}.generated_logits"] = torch.cat(generated.logits, dim=0).contiguous()
save_file(tensors, os.path.join(out, "reference.safetensors"))
with open(os.path.join(out, "reference.json"), "w") as f:
    json.dump(meta, f, indent=1)
with torch.device("meta"):
    meta_model = type(model)(config)
print(json.dumps({"num_parameters": sum(p.numel() for p in meta_model.parameters())}))
