//! Qwen2-VL and Qwen2.5-VL: config ([`config`]), processor ([`processor`]), vision tower
//! ([`vision`]), M-RoPE ([`rope`]), model ([`model`]) and the [`family::Qwen2Vl`] bundle the
//! core drives, registered for both model types.

pub mod config;
pub mod demo;
pub mod family;
pub mod model;
pub mod processor;
pub mod rope;
pub mod synthetic;
pub mod vision;

use lmms_ft_core::family::Erased;
use lmms_ft_core::registry::{Status, TrainMode};
use lmms_ft_core::{register_family, register_models};

const MODES: &[TrainMode] = &[TrainMode::Full, TrainMode::Lora, TrainMode::Qlora];

register_family! {
    name: "qwen2-vl",
    architectures: &["Qwen2VLForConditionalGeneration"],
    model_types: &["qwen2_vl"],
    modes: MODES,
    status: Status::Implemented,
    implementation: Some(&Erased::<family::Qwen2Vl>::NEW),
}

register_family! {
    name: "qwen2.5-vl",
    architectures: &["Qwen2_5_VLForConditionalGeneration"],
    model_types: &["qwen2_5_vl"],
    modes: MODES,
    status: Status::Implemented,
    implementation: Some(&Erased::<family::Qwen2Vl>::NEW),
}

register_models!(
    "qwen2-vl",
    [
        (
            "qwen2-vl-2b-instruct",
            "Qwen/Qwen2-VL-2B-Instruct",
            ["qwen2-vl-2b"],
            true
        ),
        (
            "qwen2-vl-7b-instruct",
            "Qwen/Qwen2-VL-7B-Instruct",
            ["qwen2-vl-7b"],
            true
        ),
        (
            "qwen2-vl-72b-instruct",
            "Qwen/Qwen2-VL-72B-Instruct",
            ["qwen2-vl-72b"],
            true
        ),
    ]
);

register_models!(
    "qwen2.5-vl",
    [
        (
            "qwen2.5-vl-3b-instruct",
            "Qwen/Qwen2.5-VL-3B-Instruct",
            ["qwen2.5-vl-3b"],
            true
        ),
        (
            "qwen2.5-vl-7b-instruct",
            "Qwen/Qwen2.5-VL-7B-Instruct",
            ["qwen2.5-vl-7b"],
            true
        ),
        (
            "qwen2.5-vl-72b-instruct",
            "Qwen/Qwen2.5-VL-72B-Instruct",
            ["qwen2.5-vl-72b"],
            true
        ),
    ]
);
