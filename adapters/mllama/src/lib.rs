//! Llama-3.2-Vision (`model_type = "mllama"`: cross-attention image layers). Registered as
//! planned: no model code yet.

use lmms_ft_core::registry::{Status, TrainMode};
use lmms_ft_core::{register_family, register_models};

register_family! {
    name: "llama-3.2-vision",
    architectures: &["MllamaForConditionalGeneration"],
    model_types: &["mllama"],
    modes: &[TrainMode::Full, TrainMode::Lora, TrainMode::Qlora],
    status: Status::Planned,
    implementation: None,
}

register_models!(
    "llama-3.2-vision",
    [
        (
            "llama-3.2-11b-vision-instruct",
            "meta-llama/Llama-3.2-11B-Vision-Instruct",
            ["llama-3.2-11b-vision"],
            false
        ),
        (
            "llama-3.2-90b-vision-instruct",
            "meta-llama/Llama-3.2-90B-Vision-Instruct",
            ["llama-3.2-90b-vision"],
            false
        ),
    ]
);
