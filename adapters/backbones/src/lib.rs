//! Building blocks more than one family uses: the Llama-style causal decoder (Llama, Vicuna,
//! Mistral, Qwen2 — they differ only in biases and sizes), the parsing of a composite
//! model's `text_config` into it, the CLIP / SigLIP vision towers, and the Qwen-VL
//! processor, positions and collator ([`qwen_vl`]). Families own their rotary-position scheme
//! and pass `cos` / `sin` in.

pub mod clip;
pub mod decoder;
pub mod encoder;
pub mod longrope;
pub mod qwen_vl;
pub mod siglip;
pub mod text_config;
pub mod vit;
