//! The pieces Qwen2-VL, Qwen2.5-VL and Qwen3-VL share: the processor (smart resize,
//! patchify, temporal patches), M-RoPE positions and rotary tables, the collator with its
//! sample and batch types, and the vision tower's patch layout, 2-D rotary and segment
//! attention. Each family crate keeps only what differs (configs, towers, decoders).

pub mod batch;
pub mod processor;
pub mod rope;
pub mod vision;
