//! Qwen3-VL (dense: 2B / 4B / 8B / 32B, Instruct and Thinking): config ([`config`]), vision
//! tower with learned position embeddings and DeepStack ([`vision`]), model ([`model`]) and
//! the [`family::Qwen3Vl`] bundle the core drives. The processor, M-RoPE positions and
//! collator are the Qwen-VL ones shared with Qwen2-VL (`lmms_ft_backbones::qwen_vl`).

pub mod config;
pub mod family;
pub mod model;
pub mod vision;

use lmms_ft_core::family::Erased;
use lmms_ft_core::registry::{Status, TrainMode};
use lmms_ft_core::{register_family, register_models};

register_family! {
    name: "qwen3-vl",
    architectures: &["Qwen3VLForConditionalGeneration"],
    model_types: &["qwen3_vl"],
    modes: &[TrainMode::Full, TrainMode::Lora, TrainMode::Qlora],
    status: Status::Implemented,
    implementation: Some(&Erased::<family::Qwen3Vl>::NEW),
}

register_models!(
    "qwen3-vl",
    [
        (
            "qwen3-vl-2b-instruct",
            "Qwen/Qwen3-VL-2B-Instruct",
            ["qwen3-vl-2b"],
            true
        ),
        (
            "qwen3-vl-4b-instruct",
            "Qwen/Qwen3-VL-4B-Instruct",
            ["qwen3-vl-4b"],
            true
        ),
        (
            "qwen3-vl-8b-instruct",
            "Qwen/Qwen3-VL-8B-Instruct",
            ["qwen3-vl-8b"],
            true
        ),
        (
            "qwen3-vl-32b-instruct",
            "Qwen/Qwen3-VL-32B-Instruct",
            ["qwen3-vl-32b"],
            true
        ),
        (
            "qwen3-vl-2b-thinking",
            "Qwen/Qwen3-VL-2B-Thinking",
            [],
            true
        ),
        (
            "qwen3-vl-4b-thinking",
            "Qwen/Qwen3-VL-4B-Thinking",
            [],
            true
        ),
        (
            "qwen3-vl-8b-thinking",
            "Qwen/Qwen3-VL-8B-Thinking",
            [],
            true
        ),
        (
            "qwen3-vl-32b-thinking",
            "Qwen/Qwen3-VL-32B-Thinking",
            [],
            true
        ),
    ]
);
