//! The Qwen-VL processor, shared with Qwen3-VL (`lmms_ft_backbones::qwen_vl::processor`).

pub use lmms_ft_backbones::qwen_vl::processor::*;
