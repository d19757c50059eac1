//! Phi-3-Vision and Phi-3.5-Vision (`trust_remote_code` models on the Hub, `model_type =
//! "phi3_v"`). Registered as planned: no model code yet.

use lmms_ft_core::registry::{Status, TrainMode};
use lmms_ft_core::{register_family, register_models};

register_family! {
    name: "phi3-v",
    architectures: &["Phi3VForCausalLM"],
    model_types: &["phi3_v"],
    modes: &[TrainMode::Full, TrainMode::Lora, TrainMode::Qlora],
    status: Status::Planned,
    implementation: None,
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
