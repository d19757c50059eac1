"""Build-your-own LLaVA oracle: tiny source checkpoints, and transformers' view of a composed
LLaVA checkpoint.

Usage:
  python build_llava.py sources OUT SHARED_HF_CONFIGS
      Writes OUT/llm (a tiny random LlamaForCausalLM with a plain Llama-2 tokenizer: the real
      llava-1.5 tokenizer.json without the <image> / <pad> tokens llava-hf added), OUT/clip (a
      tiny random CLIPVisionModel + its CLIPImageProcessor), OUT/images/*.png and
      OUT/data.json (a LLaVA-format dataset). Prints JSON facts about them.
  python build_llava.py sources_qwen OUT SHARED_HF_CONFIGS
      Writes OUT/qwen (tiny Qwen2ForCausalLM, real llava-interleave Qwen2 tokenizer) and
      OUT/siglip (tiny SiglipVisionModel + SiglipImageProcessor), and the same images and
      data as `sources`.
  python build_llava.py sources_llama_siglip OUT SHARED_HF_CONFIGS
      OUT/llm as `sources` writes it and OUT/siglip as `sources_qwen` does (the example
      scripts' Llama + SigLIP recipe), with the same images and data.
  python build_llava.py sources_chinese OUT SHARED_HF_CONFIGS
      Writes OUT/qwen2.5 (tiny Qwen2ForCausalLM, tied embeddings, with the real Qwen2.5
      tokenizer, which has no <image>), OUT/chinese-clip (a tiny ChineseCLIPVisionModel + a
      ChineseCLIPImageProcessor with OFA-Sys's settings: squash to a square, no crop),
      OUT/chinese-clip-full (a tiny ChineseCLIPModel: BERT text tower, projections) and the
      same images and data as `sources`.
  python build_llava.py original SRC OUT
      From `sources`' SRC/llm and SRC/clip: OUT/hf, a llava-hf LlavaForConditionalGeneration
      (vocabulary 32001: the LLM's rows plus an <image> row at their mean; the CLIP tower; a
      random projector) saved by save_pretrained, OUT/original, the same model in the original
      LLaVA repository's layout (LlavaLlamaForCausalLM config with mm_* keys, the LLM's
      32000-row vocabulary and plain tokenizer, `model.mm_projector.{0,2}`, no tower tensors:
      the tower stays in SRC/clip), and OUT/reference.safetensors: input_ids, pixel_values
      and OUT/hf's logits on them.
  python build_llava.py logits MODEL_DIR REFERENCE.safetensors
      Loads MODEL_DIR in LlavaForConditionalGeneration (any missing / unexpected weight is an
      error) and prints the max logit difference to the reference on its inputs.
  python build_llava.py check MODEL_DIR IMAGE OUT.safetensors
      Loads MODEL_DIR with LlavaForConditionalGeneration.from_pretrained and AutoProcessor
      (fails on any missing / unexpected / mismatched weight), runs one user turn with IMAGE
      through the directory's chat template (add_generation_prompt) and processor, and saves
      input_ids, pixel_values, logits and the tower's selected features (hidden_states at
      vision_feature_layer, strategy applied). Prints JSON facts on the last line.
  python build_llava.py peft BASE_DIR ADAPTER_DIR MERGED_DIR
      PEFT's PeftModel over BASE_DIR with ADAPTER_DIR (warnings are errors) against
      MERGED_DIR: prints the max logit differences to MERGED_DIR and to BASE_DIR.
"""

import json
import os
import shutil
import sys
import warnings

import numpy as np
import torch
from PIL import Image


def write_data(out):
    """OUT/images/img{0..3}.png (noise, mostly non-square), OUT/data.json (LLaVA format) and
    OUT/probe.png."""
    images = os.path.join(out, "images")
    os.makedirs(images, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i, (w, h) in enumerate([(100, 60), (56, 84), (70, 70), (90, 50)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(images, f"img{i}.png"))
        records.append({"id": str(i), "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": ["Red noise.", "Blue noise.", "Green noise.", "Grey noise."][i]},
        ]})
    with open(os.path.join(out, "data.json"), "w") as f:
        json.dump(records, f, indent=1)
    # Not trained on: 56 x 42 only needs padding to the 56-pixel tile, no resampling, so the
    # two processors must agree exactly and the logits can be compared end to end.
    Image.fromarray(rng.integers(0, 256, (42, 56, 3), dtype=np.uint8)).save(os.path.join(out, "probe.png"))


def tiny_llama(llm, shared):
    """A tiny random LlamaForCausalLM with a plain Llama-2 tokenizer: llava-hf's minus the two
    tokens it appended (ids >= 32000)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    real = os.path.join(shared, "llava-hf--llava-1.5-7b-hf")
    os.makedirs(llm, exist_ok=True)
    text = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                       max_position_embeddings=4096, tie_word_embeddings=False)
    LlamaForCausalLM(text).float().save_pretrained(llm)
    with open(os.path.join(real, "tokenizer.json")) as f:
        tok = json.load(f)
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < 32000]
    with open(os.path.join(llm, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    with open(os.path.join(real, "tokenizer_config.json")) as f:
        tc = json.load(f)
    tc["added_tokens_decoder"] = {k: v for k, v in tc["added_tokens_decoder"].items() if int(k) < 32000}
    for key in ("extra_special_tokens", "image_token", "pad_token", "processor_class", "chat_template"):
        tc.pop(key, None)
    with open(os.path.join(llm, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=1)
    plain = AutoTokenizer.from_pretrained(llm)
    assert len(plain) == 32000, len(plain)
    assert "<image>" not in plain.get_vocab()
    return plain


def tiny_siglip(siglip):
    """A tiny random SiglipVisionModel (with its attention-pooling head) + its processor."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14, layer_norm_eps=1e-6)
    SiglipVisionModel(vision).float().save_pretrained(siglip)
    SiglipImageProcessorPil(size={"height": 56, "width": 56}).save_pretrained(siglip)


def sources(out, shared):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    llm = os.path.join(out, "llm")
    clip = os.path.join(out, "clip")
    os.makedirs(llm, exist_ok=True)
    os.makedirs(clip, exist_ok=True)

    plain = tiny_llama(llm, shared)

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=16)
    CLIPVisionModel(vision).float().save_pretrained(clip)
    CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(clip)

    write_data(out)
    from safetensors import safe_open
    with safe_open(os.path.join(llm, "model.safetensors"), "pt") as f:
        llm_keys = sorted(f.keys())
    with safe_open(os.path.join(clip, "model.safetensors"), "pt") as f:
        clip_keys = sorted(f.keys())
    print(json.dumps({"llm_keys": llm_keys, "clip_keys": clip_keys, "vocab": len(plain)}))


def sources_qwen(out, shared):
    """OUT/qwen (a tiny Qwen2ForCausalLM, tied embeddings, with the real Qwen2 tokenizer from
    llava-interleave-qwen) and OUT/siglip (a tiny SiglipVisionModel
    with its attention-pooling head, + SiglipImageProcessor)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    torch.manual_seed(1)
    real = os.path.join(shared, "llava-hf--llava-interleave-qwen-7b-hf")
    qwen = os.path.join(out, "qwen")
    siglip = os.path.join(out, "siglip")
    text = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       max_position_embeddings=4096, tie_word_embeddings=True)
    Qwen2ForCausalLM(text).float().save_pretrained(qwen)
    # The real Qwen2 tokenizer as llava-interleave-qwen ships it, <image> (151646) included:
    # composing must reuse that id rather than add a second one.
    Qwen2Tokenizer.from_pretrained(real).save_pretrained(qwen)
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(qwen, name)):
            os.remove(os.path.join(qwen, name))
    tiny_siglip(siglip)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(qwen)
    write_data(out)
    print(json.dumps({"image_token_id": tokenizer.convert_tokens_to_ids("<image>")}))


def sources_llama_siglip(out, shared):
    """OUT/llm (tiny Llama, as `sources`) and OUT/siglip (tiny SigLIP, as `sources_qwen`)."""
    torch.manual_seed(4)
    tiny_llama(os.path.join(out, "llm"), shared)
    tiny_siglip(os.path.join(out, "siglip"))
    write_data(out)


def sources_chinese(out, shared):
    """A Qwen2.5-0.5B-Instruct-like LLM and a Chinese-CLIP ViT-B/16-like tower, both tiny."""
    from transformers import (ChineseCLIPConfig, ChineseCLIPModel, ChineseCLIPVisionConfig,
                              ChineseCLIPVisionModel, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer)
    from transformers.models.chinese_clip.image_processing_pil_chinese_clip import ChineseCLIPImageProcessorPil

    torch.manual_seed(2)
    qwen = os.path.join(out, "qwen2.5")
    text = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       max_position_embeddings=4096, tie_word_embeddings=True)
    Qwen2ForCausalLM(text).float().save_pretrained(qwen)
    # Qwen2.5-VL's tokenizer files are Qwen2.5's (the LLM tokenizer has the vision tokens too).
    Qwen2Tokenizer.from_pretrained(os.path.join(shared, "Qwen--Qwen2.5-VL-3B-Instruct")).save_pretrained(qwen)
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(qwen, name)):
            os.remove(os.path.join(qwen, name))
    vision = ChineseCLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=2, image_size=56, patch_size=14, projection_dim=16)
    # OFA-Sys/chinese-clip-vit-base-patch16's preprocessor_config: an exact square resize,
    # no center crop (crop_size given as a bare integer).
    processor = ChineseCLIPImageProcessorPil(size={"height": 56, "width": 56}, do_center_crop=False, crop_size=56)
    tower = os.path.join(out, "chinese-clip")
    ChineseCLIPVisionModel(vision).float().save_pretrained(tower)
    processor.save_pretrained(tower)
    full = os.path.join(out, "chinese-clip-full")
    text_tower = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64)
    ChineseCLIPModel(ChineseCLIPConfig(text_config=text_tower, vision_config=vision.to_dict(),
                                       projection_dim=16)).float().save_pretrained(full)
    processor.save_pretrained(full)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(qwen)
    assert "<image>" not in tokenizer.get_vocab()
    write_data(out)
    print(json.dumps({"tokenizer_size": len(tokenizer)}))


def original(src, out):
    """The original LLaVA's naming, from its source: LlavaLlamaForCausalLM is a
    LlamaForCausalLM whose `model` (LlavaLlamaModel, a LlamaModel) also holds `mm_projector`
    (nn.Sequential(Linear, GELU, Linear): indices 0 and 2) and `vision_tower` (a
    CLIPVisionTower wrapping CLIPVisionModel as `.vision_tower`), saved without the tower
    when it was frozen."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(3)
    llm_dir, clip_dir = os.path.join(src, "llm"), os.path.join(src, "clip")
    text = LlamaConfig.from_pretrained(llm_dir)
    vision = CLIPVisionConfig.from_pretrained(clip_dir)
    llm = load_file(os.path.join(llm_dir, "model.safetensors"))
    tower = load_file(os.path.join(clip_dir, "model.safetensors"))
    text.vocab_size = 32001
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=32000,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config).float().eval()
    state = model.state_dict()
    with torch.no_grad():
        for name, t in llm.items():
            target = "lm_head.weight" if name == "lm_head.weight" else "model.language_model." + name[len("model."):]
            if t.shape[0] == 32000 and state[target].shape[0] == 32001:
                mean = t.double().mean(0).float()
                t = torch.cat([t, mean[None]], 0)
            state[target].copy_(t)
        for name, t in tower.items():
            state["model.vision_tower." + name.removeprefix("vision_model.")].copy_(t)
    hf = os.path.join(out, "hf")
    model.save_pretrained(hf)

    orig = os.path.join(out, "original")
    os.makedirs(orig, exist_ok=True)
    weights = {}
    for name, t in model.state_dict().items():
        if name.startswith("model.vision_tower."):
            continue
        if name.startswith("model.multi_modal_projector."):
            rest = name[len("model.multi_modal_projector."):]
            rest = rest.replace("linear_1.", "0.").replace("linear_2.", "2.")
            key = "model.mm_projector." + rest
        elif name.startswith("model.language_model."):
            key = "model." + name[len("model.language_model."):]
        else:
            key = name
        if name in ("lm_head.weight", "model.language_model.embed_tokens.weight"):
            t = t[:32000]
        weights[key] = t.contiguous().clone()
    save_file(weights, os.path.join(orig, "model.safetensors"), metadata={"format": "pt"})
    cfg = text.to_dict()
    cfg.update({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "vocab_size": 32000,
                "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": vision.hidden_size,
                "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
                "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad",
                "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False,
                "freeze_mm_mlp_adapter": False, "unfreeze_mm_vision_tower": False, "use_mm_proj": True,
                "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "torch_dtype": "float32"})
    for key in ("dtype", "transformers_version", "output_hidden_states", "return_dict"):
        cfg.pop(key, None)
    with open(os.path.join(orig, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(llm_dir, name), os.path.join(orig, name))

    ids = torch.tensor([[1, 3148, 1001, 29901] + [32000] * 16 + [13, 5618, 338, 29973]])
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
    save_file({"input_ids": ids, "pixel_values": pixels, "logits": logits.contiguous()},
              os.path.join(out, "reference.safetensors"))
    print(json.dumps({"original_keys": sorted(weights)}))


def logits(model_dir, reference):
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"loading {model_dir}: {problems}")
    ref = load_file(reference)
    with torch.no_grad():
        theirs = model.float().eval()(input_ids=ref["input_ids"], pixel_values=ref["pixel_values"]).logits
    print(json.dumps({"max_diff": (theirs - ref["logits"]).abs().max().item()}))


def check(model_dir, image, out):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model, info = LlavaForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"loading {model_dir}: {problems}")
    model = model.float().eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    img = Image.open(image).convert("RGB")
    batch = processor(text=[text], images=[img], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        states = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
        features = states[model.config.vision_feature_layer]
        if model.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
    from safetensors.torch import save_file
    save_file({"input_ids": batch["input_ids"].contiguous(), "pixel_values": batch["pixel_values"].contiguous(),
               "logits": logits.contiguous(), "vision_features": features.contiguous()}, out)
    print(json.dumps({"text": text, "image_processor": type(processor.image_processor).__name__,
                      "image_token_id": model.config.image_token_id,
                      "vocab_size": model.config.text_config.vocab_size,
                      "num_image_tokens": int((batch["input_ids"] == model.config.image_token_id).sum())}))


def peft_check(base_dir, adapter_dir, merged_dir):
    """PEFT applies ADAPTER over BASE (any warning, e.g. missing adapter keys, is an error);
    prints how far its logits are from MERGED's (lmms-ft's merge-lora output) and BASE's."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        base = LlavaForConditionalGeneration.from_pretrained(base_dir).float().eval()
        with torch.no_grad():
            ids = torch.tensor([[1, 3148, 1001, 29901] + [base.config.image_token_id] * 16 + [13, 5618, 338]])
            pixels = torch.randn(1, 3, 56, 56)
            base_logits = base(input_ids=ids, pixel_values=pixels).logits
        peft = PeftModel.from_pretrained(base, adapter_dir).eval()
    merged = LlavaForConditionalGeneration.from_pretrained(merged_dir).float().eval()
    with torch.no_grad():
        adapted = peft(input_ids=ids, pixel_values=pixels).logits
        theirs = merged(input_ids=ids, pixel_values=pixels).logits
    print(json.dumps({"peft_vs_merged": (adapted - theirs).abs().max().item(),
                      "peft_vs_base": (adapted - base_logits).abs().max().item()}))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "sources":
        sources(sys.argv[2], sys.argv[3])
    elif mode == "sources_qwen":
        sources_qwen(sys.argv[2], sys.argv[3])
    elif mode == "sources_llama_siglip":
        sources_llama_siglip(sys.argv[2], sys.argv[3])
    elif mode == "sources_chinese":
        sources_chinese(sys.argv[2], sys.argv[3])
    elif mode == "original":
        original(sys.argv[2], sys.argv[3])
    elif mode == "logits":
        logits(sys.argv[2], sys.argv[3])
    elif mode == "check":
        check(sys.argv[2], sys.argv[3], sys.argv[4])
    elif mode == "peft":
        peft_check(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {mode}")
