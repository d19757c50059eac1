//! Qwen2-VL and Qwen2.5-VL: config, vision tower, M-RoPE and the conditional-generation model.
//! The processor and chat template land with the data pipeline; until then the family is
//! registered as planned.

pub mod config;
pub mod model;
pub mod rope;
pub mod vision;

use lmms_ft_core::registry::{Status, TrainMode};
use lmms_ft_core::{register_family, register_models};

const MODES: &[TrainMode] = &[TrainMode::Full, TrainMode::Lora, TrainMode::Qlora];

register_family! {
    name: "qwen2-vl",
    architectures: &["Qwen2VLForConditionalGeneration"],
    model_types: &["qwen2_vl"],
    modes: MODES,
    status: Status::Planned,
    implementation: None,
}

register_family! {
    name: "qwen2.5-vl",
    architectures: &["Qwen2_5_VLForConditionalGeneration"],
    model_types: &["qwen2_5_vl"],
    modes: MODES,
    status: Status::Planned,
    implementation: None,
}

register_models!("qwen2-vl", [
    ("qwen2-vl-2b-instruct", "Qwen/Qwen2-VL-2B-Instruct", ["qwen2-vl-2b"], true),
    ("qwen2-vl-7b-instruct", "Qwen/Qwen2-VL-7B-Instruct", ["qwen2-vl-7b"], true),
    ("qwen2-vl-72b-instruct", "Qwen/Qwen2-VL-72B-Instruct", ["qwen2-vl-72b"], true),
]);

register_models!("qwen2.5-vl", [
    ("qwen2.5-vl-3b-instruct", "Qwen/Qwen2.5-VL-3B-Instruct", ["qwen2.5-vl-3b"], true),
    ("qwen2.5-vl-7b-instruct", "Qwen/Qwen2.5-VL-7B-Instruct", ["qwen2.5-vl-7b"], true),
    ("qwen2.5-vl-72b-instruct", "Qwen/Qwen2.5-VL-72B-Instruct", ["qwen2.5-vl-72b"], true),
]);
