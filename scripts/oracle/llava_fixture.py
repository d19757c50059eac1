"""Tiny random LLaVA checkpoints and reference outputs from pinned transformers.

Usage: python llava_fixture.py OUT_DIR VARIANT SHARED_HF_CONFIGS

VARIANT:
  llava        LLaVA-1.5 layout: CLIP vision (layer -2, "default" drops CLS) + Llama text,
               real llava-1.5 tokenizer and template.
  llava_multi  Same, but `vision_feature_layer = [-3, -1]` (concatenated features).
  interleave   LLaVA-Interleave layout: SigLIP vision (layer -1, "full") + Qwen2 text
               (tied embeddings), real llava-interleave-qwen tokenizer and template.
  next_vicuna  LLaVA-NeXT (anyres over 56-pixel tiles) + Llama text, llava-1.5 tokenizer and
               template.
  next_mistral LLaVA-NeXT + Mistral text (sliding window 4096), llava-1.5 tokenizer with the
               llava-v1.6-mistral template.
  next_video   LLaVA-NeXT-Video: NeXT images + average-pooled (stride 2) video frames, Llama text,
               llava-1.5 tokenizer with a `<video>` token added, the NeXT-Video template.
  next_video_max  The same with spatial_pool_mode = "max".
  onevision    LLaVA-OneVision: SigLIP + Qwen2 (tied), anyres_max_1 (so the tiny single image is
               downscaled), one tile + newline per image of a multi-image sample, bilinear-pooled
               video frames ending in one newline; interleave-qwen tokenizer plus `<video>`.

Writes into OUT_DIR a checkpoint saved by `save_pretrained`, the processor and tokenizer, and
`reference.safetensors` + `reference.json` holding, for three samples (text-only, one
non-square image that needs a resize, two images over two turns, and for the video variants a
four-frame video): the processor's inputs,
logits, loss and the gradients of a few named parameters after one backward; and, from each
sample's generation prompt, transformers' greedy `generate` tokens and per-step logits. Prints the
checkpoint's tensor names and transformers' parameter count (meta device) as JSON on the
last line.
"""

import json
import os
import re
import sys

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    MistralConfig,
    Qwen2Config,
    Qwen2Tokenizer,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next_video.video_processing_llava_next_video import LlavaNextVideoVideoProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

out, variant, shared = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
np.random.seed(0)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

if variant in ("llava", "llava_multi"):
    real = os.path.join(shared, "llava-hf--llava-1.5-7b-hf")
    text = LlamaConfig(vocab_size=32064, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                       max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=16)
    layer = -2 if variant == "llava" else [-3, -1]
    # "llava" expands images to a square with the mean colour (LlavaImageProcessor's do_pad);
    # "llava_multi" keeps the llava-hf CLIP center crop, which lmms-ft applies when config.json
    # says image_aspect_ratio = "square" (the original LLaVA's key).
    extra = {} if variant == "llava" else {"image_aspect_ratio": "square"}
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=32000,
                         pad_token_id=32001, vision_feature_layer=layer, vision_feature_select_strategy="default",
                         image_seq_length=16, **extra)
    if variant == "llava":
        image_processor = LlavaImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                                 image_mean=CLIP_MEAN, image_std=CLIP_STD, do_pad=True)
    else:
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                                image_mean=CLIP_MEAN, image_std=CLIP_STD)
    tokenizer = AutoTokenizer.from_pretrained(real)
    with open(os.path.join(real, "chat_template.json")) as f:
        template = json.load(f)["chat_template"]
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=template)
    vision_prefix = "model.vision_tower."
elif variant == "interleave":
    real = os.path.join(shared, "llava-hf--llava-interleave-qwen-7b-hf")
    text = Qwen2Config(vocab_size=152000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       max_position_embeddings=4096, tie_word_embeddings=True)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14, vision_use_head=False, layer_norm_eps=1e-6)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=151646,
                         vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=16,
                         tie_word_embeddings=True)
    image_processor = SiglipImageProcessorPil(size={"height": 56, "width": 56})
    # The folder has vocab.json + merges.txt but no tokenizer.json; AutoTokenizer's generic
    # backend cannot build from those, the Qwen2 class can.
    tokenizer = Qwen2Tokenizer.from_pretrained(real)
    with open(os.path.join(real, "chat_template.json")) as f:
        template = json.load(f)["chat_template"]
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="full", num_additional_image_tokens=0,
                               chat_template=template)
    vision_prefix = "model.vision_tower."
elif variant in ("next_vicuna", "next_mistral"):
    real = os.path.join(shared, "llava-hf--llava-1.5-7b-hf")
    sizes = dict(vocab_size=32064, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=4096)
    if variant == "next_vicuna":
        text = LlamaConfig(**sizes)
        with open(os.path.join(real, "chat_template.json")) as f:
            template = json.load(f)["chat_template"]
    else:
        text = MistralConfig(sliding_window=4096, rope_theta=1000000.0, **sizes)
        with open(os.path.join(shared, "llava-hf--llava-v1.6-mistral-7b-hf", "chat_template.json")) as f:
            template = json.load(f)["chat_template"]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=16)
    # The real pinpoints scaled from 336- to 56-pixel tiles.
    pinpoints = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
    config = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=32000,
                             pad_token_id=32001, vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=pinpoints, image_seq_length=16)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                                 image_grid_pinpoints=pinpoints, image_mean=CLIP_MEAN,
                                                 image_std=CLIP_STD)
    tokenizer = AutoTokenizer.from_pretrained(real)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=template)
    vision_prefix = "model.vision_tower."
elif variant in ("next_video", "next_video_max"):
    real = os.path.join(shared, "llava-hf--llava-1.5-7b-hf")
    text = LlamaConfig(vocab_size=32064, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=16)
    pinpoints = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
    tokenizer = AutoTokenizer.from_pretrained(real)
    tokenizer.add_tokens(["<video>"], special_tokens=True)
    config = LlavaNextVideoConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=32000,
                                  video_token_index=tokenizer.convert_tokens_to_ids("<video>"), pad_token_id=32001,
                                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                                  image_grid_pinpoints=pinpoints, spatial_pool_stride=2,
                                  spatial_pool_mode="max" if variant == "next_video_max" else "average",
                                  image_seq_length=16, video_seq_length=4)
    # The template transformers' NeXT-Video conversion script writes: llava-1.5's plus videos.
    template = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
                "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
                "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}"
                "{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
                "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                                 image_grid_pinpoints=pinpoints, image_mean=CLIP_MEAN,
                                                 image_std=CLIP_STD)
    video_processor = LlavaNextVideoVideoProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaNextVideoProcessor(video_processor=video_processor, image_processor=image_processor,
                                        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                                        num_additional_image_tokens=1, chat_template=template)
    vision_prefix = "model.vision_tower."
elif variant == "onevision":
    real = os.path.join(shared, "llava-hf--llava-interleave-qwen-7b-hf")
    text = Qwen2Config(vocab_size=152000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       max_position_embeddings=4096, tie_word_embeddings=True)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14, vision_use_head=False, layer_norm_eps=1e-6)
    pinpoints = [[56 * i, 56 * j] for i in range(1, 4) for j in range(1, 4)]
    tokenizer = Qwen2Tokenizer.from_pretrained(real)
    tokenizer.add_tokens(["<video>"], special_tokens=True)
    config = LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=151646,
                                  video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_1",
                                  tie_word_embeddings=True)
    # The template transformers' OneVision conversion script writes.
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
                "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
                "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}"
                "{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
                "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
                "{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 56, "width": 56}, image_grid_pinpoints=pinpoints,
                                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": 56, "width": 56}, image_mean=[0.5] * 3,
                                                   image_std=[0.5] * 3)
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=video_processor, num_image_tokens=16,
                                        vision_feature_select_strategy="full", chat_template=template,
                                        vision_aspect_ratio="anyres_max_1")
    vision_prefix = "model.vision_tower."
else:
    raise SystemExit(f"unknown variant {variant}")

Model = {"next_video": LlavaNextVideoForConditionalGeneration, "next_video_max": LlavaNextVideoForConditionalGeneration,
         "onevision": LlavaOnevisionForConditionalGeneration}.get(
    variant, LlavaNextForConditionalGeneration if variant.startswith("next") else LlavaForConditionalGeneration)
model = Model(config).float().eval()
model.save_pretrained(out)
tokenizer.save_pretrained(out)
processor.save_pretrained(out)
# The tokenizer brings its own folder's template; the directory must hold the processor's.
with open(os.path.join(out, "chat_template.jinja"), "w") as f:
    f.write(template)


def noise_image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# Both non-square: 56 wide x 84 high (tall) and 100 x 60 (wide), so anyres unpads columns for
# one and rows for the other; CLIP crops / resizes both.
img_a = noise_image(56, 84, 1)
img_b = noise_image(100, 60, 2)
img_a.save(os.path.join(out, "image_a.png"))
img_b.save(os.path.join(out, "image_b.png"))

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
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "First?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "image"}, {"type": "text", "text": "this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
    ],
}
media = {"text": [], "image": [img_b], "two_images": [img_a, img_b]}
videos = {name: [] for name in samples}
if variant in ("next_video", "next_video_max", "onevision"):
    # Four frames, 56 wide x 70 high: NeXT-Video's shortest edge needs no resize, only the center
    # crop; OneVision resizes them to 56 x 56.
    frames = np.stack([np.asarray(noise_image(56, 70, 20 + i)) for i in range(4)])
    frames.tofile(os.path.join(out, "video.rgb"))
    samples["video"] = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Snow."}]},
    ]
    media["video"] = []
    videos["video"] = [frames]
track = [
    "model.language_model.layers.0.self_attn.q_proj.weight",
    "model.language_model.norm.weight",
    "model.language_model.embed_tokens.weight",
    "model.multi_modal_projector.linear_1.weight",
    "model.multi_modal_projector.linear_2.bias",
    vision_prefix + "encoder.layers.0.self_attn.q_proj.weight",
    vision_prefix + "embeddings.patch_embedding.weight",
] + (["model.image_newline"] if variant.startswith("next") or variant == "onevision" else [])


def hub_name(runtime):
    """Runtime module path -> the real llava-hf Hub tensor name (what lmms-ft uses)."""
    if runtime.startswith("model.language_model."):
        return "language_model.model." + runtime[len("model.language_model."):]
    if runtime.startswith("model.vision_tower."):
        return "vision_tower.vision_model." + runtime[len("model.vision_tower."):]
    if runtime.startswith("model.multi_modal_projector.") or runtime == "model.image_newline":
        return runtime[len("model."):]
    return runtime


# The training template lmms-ft uses for Vicuna-style checkpoints (Llama text, llava-1.5 Hub
# template); the others train on their Hub template.
with open(os.path.join(os.path.dirname(__file__), "../../adapters/llava/src/vicuna_training.jinja")) as f:
    VICUNA_TRAINING = f.read()
vicuna = variant in ("llava", "llava_multi", "next_vicuna", "next_video", "next_video_max")
qwen = variant in ("interleave", "onevision")
answer_prefix = {"interleave": "<|im_start|>assistant\n\n", "onevision": "<|im_start|>assistant\n"}.get(
    variant, "[/INST]" if variant == "next_mistral" else "ASSISTANT: ")
generation_prompt = {"interleave": "<|im_start|>assistant\n"}.get(variant, answer_prefix)
end_of_turn = "<|im_end|>" if qwen else "</s>"


def call(text_in, images, clips):
    kwargs = {"videos": clips} if clips else {}
    # One list of images per text: OneVision's processor then knows a sample's images belong
    # together (`batch_num_images`) and gives each image of a multi-image sample one tile.
    nested = [images] if images and variant == "onevision" else images or None
    return processor(text=[text_in], images=nested, return_tensors="pt", **kwargs)


def label_rule(messages, images, clips, runs):
    """The label rule, applied independently of lmms-ft: assistant contents plus the
    end-of-turn token right after each, located by character offsets in the text with every
    <image> expanded; the ids are what the processor makes of the training-template text."""
    kwargs = {"chat_template": VICUNA_TRAINING} if vicuna else {}
    text_in = processor.apply_chat_template(messages, tokenize=False, **kwargs)
    batch = call(text_in, images, clips)
    pieces = re.split("(<image>|<video>)", text_in)
    counts = {"<image>": iter(runs["<image>"]), "<video>": iter(runs["<video>"])}
    expanded = "".join(p * next(counts[p]) if p in counts else p for p in pieces)
    spans, splits, cursor = [], [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        content = "".join(part["text"] for part in m["content"])
        at = expanded.index(answer_prefix + content, cursor)
        start = at + len(answer_prefix)
        spans.append((start, start + len(content)))
        splits.append(at + len(generation_prompt))
        cursor = start + len(content)
    if qwen:
        # The project's rule (core/src/data/template.rs): the generation prompt ends in "\n"
        # and the answer starts with "\n"; tokenised whole they merge into "\n\n", so the
        # answer is tokenised separately, as inference sees it after the prompt.
        ids, offsets, prev = [], [], 0
        for b in splits + [len(expanded)]:
            piece = tokenizer(expanded[prev:b], return_offsets_mapping=True, add_special_tokens=False)
            ids += piece["input_ids"]
            offsets += [(a + prev, e + prev) for a, e in piece["offset_mapping"]]
            prev = b
        enc = {"input_ids": ids, "offset_mapping": offsets}
        assert tokenizer.decode(ids) == expanded
        batch["input_ids"] = torch.tensor([ids])
    else:
        enc = tokenizer(expanded, return_offsets_mapping=True)
        assert enc["input_ids"] == batch["input_ids"][0].tolist(), "expanded text does not tokenize like the processor"
    eot = tokenizer.convert_tokens_to_ids(end_of_turn)
    rule = [-100] * len(enc["input_ids"])
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(a < e and b > s_ for s_, e in spans):
            rule[i] = enc["input_ids"][i]
    for s_, e in spans:
        after = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a >= e and b > a)
        assert enc["input_ids"][after] == eot, (enc["input_ids"][after], eot)
        rule[after] = eot
    labels = torch.tensor([rule])
    with torch.no_grad():
        loss = float(model(**batch, labels=labels).loss)
    return labels, loss, batch["input_ids"].contiguous()


def prompt_batch(messages, images, clips, runs):
    """The generation prompt of a conversation whose last turn is the user's, in the template
    lmms-ft uses (the Vicuna training template's prompt equals the Hub one's after the last
    turn, but earlier answers end in </s>); for Qwen2, earlier answers are tokenised apart
    from their generation prompt, as in `label_rule`."""
    kwargs = {"chat_template": VICUNA_TRAINING} if vicuna else {}
    text_in = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    batch = call(text_in, images, clips)
    if qwen:
        pieces = re.split("(<image>|<video>)", text_in)
        counts = {"<image>": iter(runs["<image>"]), "<video>": iter(runs["<video>"])}
        expanded = "".join(p * next(counts[p]) if p in counts else p for p in pieces)
        splits, cursor = [], 0
        for m in messages:
            if m["role"] == "assistant":
                content = "".join(part["text"] for part in m["content"])
                at = expanded.index(answer_prefix + content, cursor)
                splits.append(at + len(generation_prompt))
                cursor = at + len(answer_prefix) + len(content)
        ids, prev = [], 0
        for b in splits + [len(expanded)]:
            ids += tokenizer(expanded[prev:b], add_special_tokens=False)["input_ids"]
            prev = b
        batch["input_ids"] = torch.tensor([ids])
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch


params = dict(model.named_parameters())
stop_ids = sorted({tokenizer.convert_tokens_to_ids(end_of_turn), tokenizer.eos_token_id} - {None})
tensors, meta = {}, {"variant": variant, "samples": {}, "stop_ids": stop_ids}
for name, messages in samples.items():
    images, clips = media[name], videos[name]
    text_in = processor.apply_chat_template(messages, tokenize=False)
    batch = call(text_in, images, clips)
    ids = batch["input_ids"]
    video_id = getattr(config, "video_token_id", None)
    # Every non-media token is labeled (the label rule is tested with the data pipeline).
    labels = ids.clone()
    labels[ids == config.image_token_id] = -100
    if video_id is not None:
        labels[ids == video_id] = -100
    model.zero_grad()
    result = model(**batch, labels=labels)
    result.loss.backward()
    tensors[f"{name}.input_ids"] = ids.contiguous()
    tensors[f"{name}.labels"] = labels.contiguous()
    tensors[f"{name}.logits"] = result.logits.detach().contiguous()
    if "pixel_values" in batch:
        tensors[f"{name}.pixel_values"] = batch["pixel_values"].contiguous()
    for key in ("image_sizes", "pixel_values_videos", "batch_num_images"):
        if key in batch:
            tensors[f"{name}.{key}"] = batch[key].contiguous()
    for p in track:
        if params[p].grad is not None:
            tensors[f"{name}.grad.{hub_name(p)}"] = params[p].grad.detach().clone().contiguous()
    # Placeholder tokens per image, read off the processor's expanded ids (runs of <image>).
    runs = {}
    for token, wanted, n in (("<image>", config.image_token_id, len(images)), ("<video>", video_id, len(clips))):
        found, run = [], 0
        for tok in ids[0].tolist() + [None]:
            if tok is not None and tok == wanted:
                run += 1
            elif run:
                found.append(run)
                run = 0
        if len(found) != n:  # adjacent media would merge; the samples avoid that
            raise SystemExit(f"{name}: {len(found)} {token} runs for {n}")
        runs[token] = found
    rule_labels, rule_loss, train_ids = label_rule(messages, images, clips, runs)
    tensors[f"{name}.rule_input_ids"] = train_ids
    tensors[f"{name}.rule_labels"] = rule_labels
    # Greedy generation (8 new tokens) from the prompt before the last answer, with the same
    # media, stopping at the template's end of turn or the tokenizer's end of sequence.
    prompt = prompt_batch(messages[:-1], images, clips, runs)
    prompt.pop("mm_token_type_ids", None)
    prompt_len = prompt["input_ids"].shape[1]
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, eos_token_id=stop_ids,
                                   pad_token_id=stop_ids[0], return_dict_in_generate=True, output_logits=True)
    tensors[f"{name}.prompt_ids"] = prompt["input_ids"].clone()
    tensors[f"{name}.generated"] = generated.sequences[0, prompt_len:].contiguous()
    tensors[f"{name}.generated_logits"] = torch.cat(generated.logits, dim=0).contiguous()
    meta["samples"][name] = {"loss": result.loss.item(), "text": text_in, "num_images": len(images),
                             "messages": messages, "rule_loss": rule_loss,
                             "image_sizes": [[im.height, im.width] for im in images],
                             "tokens_per_image": runs["<image>"], "tokens_per_video": runs["<video>"],
                             "video_frames": [len(c) for c in clips]}
save_file(tensors, os.path.join(out, "reference.safetensors"))
with open(os.path.join(out, "reference.json"), "w") as f:
    json.dump(meta, f, indent=1)
with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
    keys = sorted(f.keys())
with torch.device("meta"):
    meta_model = Model(config)
print(json.dumps({"num_parameters": sum(p.numel() for p in meta_model.parameters()), "keys": keys}))
