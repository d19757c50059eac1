//! Llama-3.2-Vision (`model_type = "mllama"`): config ([`config`]), tiling processor
//! ([`processor`]), vision model ([`vision`]), the text decoder with cross-attention layers
//! ([`text`]), the model ([`model`]) and the [`family::Mllama`] bundle the core drives.

pub mod config;
pub mod family;
pub mod model;
pub mod processor;
pub mod text;
pub mod vision;

use lmms_ft_core::family::Erased;
use lmms_ft_core::registry::{Status, TrainMode};
use lmms_ft_core::{register_family, register_models};

register_family! {
    name: "llama-3.2-vision",
    architectures: &["MllamaForConditionalGeneration"],
    model_types: &["mllama"],
    modes: &[TrainMode::Full, TrainMode::Lora, TrainMode::Qlora],
    status: Status::Implemented,
    implementation: Some(&Erased::<family::Mllama>::NEW),
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
