"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints and reference outputs from pinned transformers.

Usage: python qwen2_vl_fixture.py OUT_DIR {qwen2_vl|qwen2_5_vl} SHARED_HF_CONFIGS

Writes into OUT_DIR a checkpoint saved by `save_pretrained` (Hub tensor names), the real
Qwen2.5-VL tokenizer and chat template (special tokens included), and `reference.safetensors`
+ `reference.json` holding, for four samples (text-only, one image, two images over two turns
with a system prompt, one video): the processor's inputs, the 3-D rope position ids, logits,
loss and the gradients of a few named parameters after one backward.
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

out, variant, shared = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
np.random.seed(0)
real = os.path.join(shared, "Qwen--Qwen2.5-VL-3B-Instruct")

text = dict(
    vocab_size=151936,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    rope_theta=1000000.0,
)
if variant == "qwen2_vl":
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu")
    config = Qwen2VLConfig(vision_config=vision, tie_word_embeddings=False, **text)
    model = Qwen2VLForConditionalGeneration(config)
    Processor = Qwen2VLProcessor
else:
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  window_size=56, fullatt_block_indexes=[1], tokens_per_second=2, hidden_act="silu")
    config = Qwen2_5_VLConfig(vision_config=vision, tie_word_embeddings=True, **text)
    model = Qwen2_5_VLForConditionalGeneration(config)
    Processor = Qwen2_5_VLProcessor
model = model.float().eval()
model.save_pretrained(out)
# The same weights in shards with a model.safetensors.index.json, as large Hub models ship.
model.save_pretrained(os.path.join(out, "sharded"), max_shard_size="20MB")

tokenizer = AutoTokenizer.from_pretrained(real)
with open(os.path.join(real, "chat_template.json")) as f:
    template = json.load(f)["chat_template"]
image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
video_processor = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 4)
processor = Processor(image_processor=image_processor, tokenizer=tokenizer,
                      video_processor=video_processor, chat_template=template)
processor.save_pretrained(out)
tokenizer.save_pretrained(out)


def noise_image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# 56x84 needs no resize (multiples of 28); 100x60 does.
img_a = noise_image(84, 56, 1)
img_b = noise_image(100, 60, 2)
img_a.save(os.path.join(out, "image_a.png"))
img_b.save(os.path.join(out, "image_b.png"))
video = np.stack([np.asarray(noise_image(56, 56, 10 + i)) for i in range(4)])
video.tofile(os.path.join(out, "video.rgb"))  # 4 frames of 56x56 RGB8, raw

samples = {
    "text": [
        {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "4."}]},
    ],
    "image": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]},
    ],
    "two_images": [
        {"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "First?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "image"}, {"type": "text", "text": "this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
    ],
    "video": [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Nothing."}]},
    ],
}
media = {"text": ([], []), "image": ([img_a], []), "two_images": ([img_a, img_b], []), "video": ([], [video])}
track = ["model.language_model.layers.0.self_attn.q_proj.weight", "model.visual.blocks.0.attn.qkv.weight",
         "model.visual.merger.mlp.0.weight", "model.language_model.norm.weight"]
# Names as the Hub checkpoint (and lmms-ft) call them.
hub_name = {
    "model.language_model.layers.0.self_attn.q_proj.weight": "model.layers.0.self_attn.q_proj.weight",
    "model.visual.blocks.0.attn.qkv.weight": "visual.blocks.0.attn.qkv.weight",
    "model.visual.merger.mlp.0.weight": "visual.merger.mlp.0.weight",
    "model.language_model.norm.weight": "model.norm.weight",
}
params = dict(model.named_parameters())
tensors, meta = {}, {"variant": variant, "samples": {}}
for name, messages in samples.items():
    images, videos = media[name]
    text_in = processor.apply_chat_template(messages, tokenize=False)
    kwargs = {}
    if videos:
        kwargs["videos_kwargs"] = {"do_sample_frames": False, "fps": 2.0}
    batch = processor(text=[text_in], images=images or None, videos=videos or None, return_tensors="pt", **kwargs)
    ids = batch["input_ids"]
    # The label rule, applied independently of lmms-ft: assistant contents plus the
    # <|im_end|> right after each, located by character offsets in the expanded text.
    expanded = text_in
    for token, grids in (("<|image_pad|>", batch.get("image_grid_thw")), ("<|video_pad|>", batch.get("video_grid_thw"))):
        if grids is None:
            continue
        pieces = expanded.split(token)
        counts = [int(g.prod()) // 4 for g in grids]
        expanded = pieces[0] + "".join("\0" * n + p for n, p in zip(counts, pieces[1:]))
        expanded = expanded.replace("\0", token)
    enc = tokenizer(expanded, return_offsets_mapping=True, add_special_tokens=False)
    assert enc["input_ids"] == batch["input_ids"][0].tolist(), "expanded text does not tokenize like the processor"
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        content = "".join(part["text"] for part in m["content"])
        start = expanded.index("<|im_start|>assistant\n" + content, cursor) + len("<|im_start|>assistant\n")
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rule = [-100] * len(enc["input_ids"])
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if any(a < e and b > s_ for s_, e in spans):
            rule[i] = enc["input_ids"][i]
    for s_, e in spans:
        after = next(i for i, (a, _) in enumerate(enc["offset_mapping"]) if a >= e)
        assert enc["input_ids"][after] == im_end
        rule[after] = im_end
    rule_labels = torch.tensor([rule])
    with torch.no_grad():
        rule_loss = float(model(**batch, labels=rule_labels).loss)
    tensors[f"{name}.rule_labels"] = rule_labels
    # Labels for the model-level check: every non-media token; media tokens are -100.
    labels = ids.clone()
    labels[(ids == config.image_token_id) | (ids == config.video_token_id)] = -100
    model.zero_grad()
    fwd = {k: v for k, v in batch.items()}
    result = model(**fwd, labels=labels)
    result.loss.backward()
    pos, _ = model.model.get_rope_index(
        ids, mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"), video_grid_thw=batch.get("video_grid_thw"),
        **({"second_per_grid_ts": batch["second_per_grid_ts"]} if "second_per_grid_ts" in batch else {}),
    ) if (images or videos) else (torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1), None)
    tensors[f"{name}.input_ids"] = ids.contiguous()
    tensors[f"{name}.labels"] = labels.contiguous()
    tensors[f"{name}.position_ids"] = pos.contiguous()
    tensors[f"{name}.logits"] = result.logits.detach().contiguous()
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        if key in batch:
            tensors[f"{name}.{key}"] = batch[key].contiguous()
    for p in track:
        if params[p].grad is not None:
            tensors[f"{name}.grad.{hub_name[p]}"] = params[p].grad.detach().clone().contiguous()
    meta["samples"][name] = {"loss": float(result.loss), "rule_loss": rule_loss, "text": text_in, "messages": messages,
                             "num_images": len(images), "num_videos": len(videos)}
# Greedy generation from the prompt (conversation without its final answer).
for name in ("text", "image", "two_images", "video"):
    messages = samples[name][:-1]
    images, videos = media[name]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = {"videos_kwargs": {"do_sample_frames": False}} if videos else {}
    batch = processor(text=[prompt], images=images or None, videos=videos or None, return_tensors="pt", **kwargs)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=8, do_sample=False,
                                   return_dict_in_generate=True, output_logits=True)
    tensors[f"{name}.generated"] = generated.sequences[0, batch["input_ids"].shape[1]:].contiguous()
    tensors[f"{name}.generated_logits"] = torch.cat(generated.logits, dim=0).contiguous()
save_file(tensors, os.path.join(out, "reference.safetensors"))
with open(os.path.join(out, "reference.json"), "w") as f:
    json.dump(meta, f, indent=1)
with torch.device("meta"):
    meta_model = type(model)(config)
print(json.dumps({"num_parameters": sum(p.numel() for p in meta_model.parameters())}))
