"""Tiny random Qwen3-VL checkpoint and reference outputs from pinned transformers.

Usage: python qwen3_vl_fixture.py OUT_DIR qwen3_vl HF_CONFIGS

Writes into OUT_DIR a checkpoint saved by `save_pretrained` (Hub tensor names), the real
Qwen3-VL tokenizer (Qwen2 BPE + the 4B folder's tokenizer_config.json, special tokens
included) and chat template, and `reference.safetensors` + `reference.json` holding, for four
samples (text-only, one image, two images over two turns with a system prompt, one video), a
text sample whose answer holds a `<think>` block, and a right-padded batch of two (the
two-image and the video sample): the processor's inputs, the
3-D rope position ids, logits, loss and the gradients of named parameters after one backward
(a DeepStack merger, the learned position embedding, a vision block, an LLM layer, a q-norm),
plus greedy generations. The config is small but keeps what differs from Qwen2.5-VL: patch 16,
a 4 × 4 learned position grid (interpolated to every image), DeepStack from vision blocks 0
and 1 into LLM layers 0 and 1, q/k RMSNorm with head_dim 32 ≠ hidden / heads, interleaved
M-RoPE with an uneven section, tied embeddings, and video timestamps.
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.video_utils import VideoMetadata

out, variant, shared = sys.argv[1], sys.argv[2], sys.argv[3]
assert variant == "qwen3_vl", variant
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
np.random.seed(0)
real = os.path.join(shared, "Qwen--Qwen3-VL-4B-Instruct")

text = dict(
    vocab_size=151936,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                     "mrope_section": [6, 5, 5]},
)
vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3, out_hidden_size=64, num_position_embeddings=16,
              deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh")
config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
model = Qwen3VLForConditionalGeneration(config).float().eval()
# Biases and norm weights start at 0 / 1; random values make their gradients and effects visible.
with torch.no_grad():
    for n, p in model.named_parameters():
        if n.endswith("bias") or "norm" in n:
            p.add_(torch.randn_like(p) * 0.1)
model.save_pretrained(out)

tokenizer = AutoTokenizer.from_pretrained(real)
with open(os.path.join(real, "chat_template.json")) as f:
    template = json.load(f)["chat_template"]
mean_std = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
image_processor = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                           min_pixels=32 * 32 * 2, max_pixels=32 * 32 * 8, **mean_std)
video_processor = Qwen3VLVideoProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 64},
                                        patch_size=16, temporal_patch_size=2, merge_size=2,
                                        cap_pixels_per_frame=False, **mean_std)
processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                             video_processor=video_processor, chat_template=template)
processor.save_pretrained(out)
tokenizer.save_pretrained(out)


def noise_image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# 96x64 needs no resize (multiples of 32); 100x60 does.
img_a = noise_image(96, 64, 1)
img_b = noise_image(100, 60, 2)
img_a.save(os.path.join(out, "image_a.png"))
img_b.save(os.path.join(out, "image_b.png"))
video = np.stack([np.asarray(noise_image(64, 64, 10 + i)) for i in range(4)])
video.tofile(os.path.join(out, "video.rgb"))  # 4 frames of 64x64 RGB8, raw
# Frames sampled at 2 fps: timestamps 0.25 s and 1.25 s per temporal patch (ties for `:.1f`).
VIDEO_FPS = 2.0


def video_kwargs():
    meta = VideoMetadata(total_num_frames=4, fps=VIDEO_FPS, frames_indices=[0, 1, 2, 3])
    return {"videos_kwargs": {"do_sample_frames": False, "video_metadata": [meta]}}


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
    # A reasoning block in the answer: <think> / </think> are special tokens of the tokenizer,
    # and the Instruct template passes them through as content.
    "think": [
        {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<think>\nTwo and two.\n</think>\n\n4."}]},
    ],
}
media = {"text": ([], []), "image": ([img_a], []), "two_images": ([img_a, img_b], []), "video": ([], [video]),
         "think": ([], [])}
# Runtime names = Hub names for Qwen3-VL (its checkpoints already use the nested layout).
track = ["model.language_model.layers.0.self_attn.q_proj.weight", "model.language_model.layers.1.self_attn.q_norm.weight",
         "model.visual.blocks.0.attn.qkv.weight", "model.visual.pos_embed.weight", "model.visual.patch_embed.proj.bias",
         "model.visual.deepstack_merger_list.1.linear_fc1.weight", "model.visual.merger.linear_fc2.weight",
         "model.language_model.embed_tokens.weight"]
params = dict(model.named_parameters())
im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")


def rule_labels(text_in, messages, ids):
    """The label rule, applied independently of lmms-ft: assistant contents plus the <|im_end|>
    right after each, located by character offsets in the expanded text (the processor's ids
    decoded, which byte-level BPE does losslessly)."""
    expanded = tokenizer.decode(ids, skip_special_tokens=False)
    enc = tokenizer(expanded, return_offsets_mapping=True, add_special_tokens=False)
    assert enc["input_ids"] == ids, "expanded text does not tokenize like the processor"
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        content = "".join(part["text"] for part in m["content"])
        start = expanded.index("<|im_start|>assistant\n" + content, cursor) + len("<|im_start|>assistant\n")
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    rule = [-100] * len(ids)
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if any(a < e and b > s_ for s_, e in spans):
            rule[i] = ids[i]
    for s_, e in spans:
        after = next(i for i, (a, _) in enumerate(enc["offset_mapping"]) if a >= e)
        assert ids[after] == im_end
        rule[after] = im_end
    return rule


def rope_index(batch):
    ids = batch["input_ids"]
    if "image_grid_thw" not in batch and "video_grid_thw" not in batch:
        return torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1)
    pos, _ = model.model.get_rope_index(
        ids, mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"), attention_mask=batch.get("attention_mask"))
    return pos


tensors, meta = {}, {"variant": variant, "video_fps": VIDEO_FPS, "samples": {}}


def record(name, batch, labels, texts, rule_loss=None):
    model.zero_grad()
    result = model(**batch, labels=labels)
    result.loss.backward()
    tensors[f"{name}.input_ids"] = batch["input_ids"].contiguous()
    tensors[f"{name}.attention_mask"] = batch["attention_mask"].contiguous()
    tensors[f"{name}.labels"] = labels.contiguous()
    tensors[f"{name}.position_ids"] = rope_index(batch).contiguous()
    tensors[f"{name}.logits"] = result.logits.detach().contiguous()
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if key in batch:
            tensors[f"{name}.{key}"] = batch[key].contiguous()
    for p in track:
        if params[p].grad is not None:
            tensors[f"{name}.grad.{p}"] = params[p].grad.detach().clone().contiguous()
    meta["samples"][name] = {"loss": float(result.loss), "rule_loss": rule_loss if rule_loss is not None else float(result.loss),
                             "text": texts}


rules = {}
for name, messages in samples.items():
    images, videos = media[name]
    text_in = processor.apply_chat_template(messages, tokenize=False)
    kwargs = video_kwargs() if videos else {}
    batch = processor(text=[text_in], images=images or None, videos=videos or None, return_tensors="pt", **kwargs)
    ids = batch["input_ids"]
    rule = torch.tensor([rule_labels(text_in, messages, ids[0].tolist())])
    rules[name] = rule[0]
    with torch.no_grad():
        rule_loss = float(model(**batch, labels=rule).loss)
    tensors[f"{name}.rule_labels"] = rule
    # Labels for the model-level check: every non-media token; media tokens are -100.
    labels = ids.clone()
    labels[(ids == config.image_token_id) | (ids == config.video_token_id)] = -100
    record(name, batch, labels, [text_in], rule_loss)
    meta["samples"][name].update(messages=messages, num_images=len(images), num_videos=len(videos))

# A right-padded batch of two: images in one row, a video in the other (DeepStack then joins
# image and video features), labels by the rule.
pair = ["two_images", "video"]
texts = [processor.apply_chat_template(samples[n], tokenize=False) for n in pair]
batch = processor(text=texts, images=media["two_images"][0], videos=media["video"][1], padding=True,
                  return_tensors="pt", **video_kwargs())
assert tokenizer.padding_side == "right"
labels = torch.full_like(batch["input_ids"], -100)
for row, n in enumerate(pair):
    labels[row, : len(rules[n])] = rules[n]
record("batch", batch, labels, texts)
meta["samples"]["batch"]["rows"] = pair

# Greedy generation from the prompt (conversation without its final answer).
for name in ("text", "image", "two_images", "video"):
    messages = samples[name][:-1]
    images, videos = media[name]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = video_kwargs() if videos else {}
    batch = processor(text=[prompt], images=images or None, videos=videos or None, return_tensors="pt", **kwargs)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=8, do_sample=False,
                                   return_dict_in_generate=True, output_logits=True)
    tensors[f"{name}.prompt_ids"] = batch["input_ids"][0].contiguous()
    tensors[f"{name}.generated"] = generated.sequences[0, batch["input_ids"].shape[1]:].contiguous()
    tensors[f"{name}.generated_logits"] = torch.cat(generated.logits, dim=0).contiguous()
save_file(tensors, os.path.join(out, "reference.safetensors"))
with open(os.path.join(out, "reference.json"), "w") as f:
    json.dump(meta, f, indent=1)
with torch.device("meta"):
    meta_model = type(model)(config)
print(json.dumps({"num_parameters": sum(p.numel() for p in meta_model.parameters())}))
