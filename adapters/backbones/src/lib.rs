//! Building blocks more than one family uses: the Llama-style causal decoder (Llama, Vicuna,
//! Mistral, Qwen2 — they differ only in biases and sizes) and, later, the CLIP / SigLIP vision
//! towers. Families own their rotary-position scheme and pass `cos` / `sin` in.

pub mod decoder;
