//! The tiny Qwen2-VL `lmms-ft demo` trains: random weights, a word-level tokenizer over the
//! demo's words and Qwen2-VL's special tokens, its ChatML template, and a processor that takes
//! the demo's pictures at their own size. Registered with the core's demo hook so the binary
//! never names a family.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use lmms_ft_core::family::HfConfig;
use lmms_ft_core::nn::ParamInit;
use lmms_ft_core::peft::io::save_hf_weights;
use lmms_ft_core::register_demo;
use tch::Device;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::{AddedToken, Tokenizer};

use crate::config::Qwen2VlConfig;
use crate::model::Qwen2VlModel;

register_demo!(name: "qwen2-vl", write_model: write_model);

const SPECIAL: [&str; 8] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
];
/// The words of the template itself, besides the demo's.
const TEMPLATE_WORDS: [&str; 8] = [
    "system",
    "user",
    "assistant",
    "You",
    "are",
    "a",
    "helpful",
    ".",
];
/// ChatML as Qwen2-VL writes it, with its default system prompt.
const TEMPLATE: &str = "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Writes the tiny model directory: config, tokenizer, template, processor config and random
/// weights, in the layout a Hub Qwen2-VL checkpoint has.
pub fn write_model(dir: &Path, words: &[&str], side: u32, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for w in SPECIAL.iter().chain(&TEMPLATE_WORDS).chain(words) {
        let n = vocab.len() as u32;
        vocab.entry(w.to_string()).or_insert(n);
    }
    let model = WordLevel::builder()
        .vocab(vocab.clone().into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .map_err(|e| anyhow::anyhow!("building the demo tokenizer: {e}"))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    let special: Vec<AddedToken> = SPECIAL.iter().map(|t| AddedToken::from(*t, true)).collect();
    tokenizer.add_special_tokens(&special);
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("saving the demo tokenizer: {e}"))?;
    let id = |t: &str| vocab[t];
    let json = |name: &str, value: serde_json::Value| -> Result<()> {
        std::fs::write(dir.join(name), serde_json::to_string_pretty(&value)?)
            .with_context(|| format!("writing {name}"))
    };
    json(
        "tokenizer_config.json",
        serde_json::json!({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}),
    )?;
    std::fs::write(dir.join("chat_template.jinja"), TEMPLATE)?;
    json(
        "preprocessor_config.json",
        serde_json::json!({
            "min_pixels": side * side, "max_pixels": side * side, "patch_size": 14,
            "temporal_patch_size": 2, "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor"
        }),
    )?;
    json(
        "generation_config.json",
        serde_json::json!({"eos_token_id": [id("<|im_end|>")]}),
    )?;
    let config = serde_json::json!({
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "vocab_size": vocab.len(),
        "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "rope_scaling": {"type": "mrope", "mrope_section": [4, 4, 4]},
        "tie_word_embeddings": false,
        "image_token_id": id("<|image_pad|>"), "video_token_id": id("<|video_pad|>"),
        "vision_start_token_id": id("<|vision_start|>"), "vision_end_token_id": id("<|vision_end|>"),
        "bos_token_id": id("<|endoftext|>"), "eos_token_id": id("<|im_end|>"),
        "vision_config": {"depth": 3, "embed_dim": 96, "hidden_size": 96, "num_heads": 4,
                          "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "in_channels": 3, "hidden_act": "quick_gelu"}
    });
    json("config.json", config.clone())?;
    let parsed = Qwen2VlConfig::from_hf_json(&config)?;
    tch::manual_seed(seed as i64);
    let model = Qwen2VlModel::new(&parsed, Device::Cpu, ParamInit::Normal { std: 0.02 });
    save_hf_weights(&model, dir, usize::MAX)
}
