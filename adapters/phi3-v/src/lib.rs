//! Phi-3-Vision and Phi-3.5-Vision (`trust_remote_code` models on the Hub, `model_type =
//! "phi3_v"`): config ([`config`]), the HD-transform processor ([`processor`]), the template
//! with `<|image_N|>` tags ([`template`]), the image embedding ([`vision`]), the model
//! ([`model`]) and the [`family::Phi3V`] bundle. The oracle is the Hub's own remote code (see
//! `scripts/oracle/phi3v_fixture.py`).

pub mod config;
pub mod family;
pub mod model;
pub mod processor;
pub mod template;
pub mod vision;

use lmms_ft_core::family::Erased;
use lmms_ft_core::registry::{Status, TrainMode};
use lmms_ft_core::{register_family, register_models};

register_family! {
    name: "phi3-v",
    architectures: &["Phi3VForCausalLM"],
    model_types: &["phi3_v"],
    modes: &[TrainMode::Full, TrainMode::Lora, TrainMode::Qlora],
    status: Status::Implemented,
    implementation: Some(&Erased::<family::Phi3V>::NEW),
}

register_models!(
    "phi3-v",
    [
        (
            "phi3-v",
            "microsoft/Phi-3-vision-128k-instruct",
            ["phi-3-vision-128k-instruct"],
            false
        ),
        (
            "phi3.5-v",
            "microsoft/Phi-3.5-vision-instruct",
            ["phi-3.5-vision-instruct"],
            true
        ),
    ]
);
