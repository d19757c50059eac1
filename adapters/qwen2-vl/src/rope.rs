//! M-RoPE positions and tables, shared with Qwen3-VL (`lmms_ft_backbones::qwen_vl::rope`).

pub use lmms_ft_backbones::qwen_vl::rope::*;
