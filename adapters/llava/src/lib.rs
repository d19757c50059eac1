//! The LLaVA family: LLaVA-1.5, LLaVA-NeXT (1.6), LLaVA-NeXT-Video, LLaVA-Interleave and
//! LLaVA-OneVision. Interleave checkpoints are `model_type = "llava"` with a Qwen2 text model,
//! so they share the `llava` family with 1.5.
//!
//! All four are implemented by one [`family::Llava`] bundle: config parsing ([`config`]),
//! models ([`model`], video features in [`video`]), anyres geometry ([`anyres`]),
//! multi-layout checkpoint loading ([`weights`]), the image and video-frame processors
//! ([`processor`]), templates and collator. Build-your-own LLaVA is [`compose`]; checkpoints
//! of the original LLaVA repository are read through [`original`].
//!
//! Interleave video: `LlavaForConditionalGeneration` has no video input and transformers'
//! `LlavaProcessor` no video path, so there is no oracle for a `<video>` placeholder; the
//! llava-interleave recipe feeds a video as its frames, each an `<image>`, which is what a
//! sample listing the frames as images gets here (a `video` entry is refused with that hint).

pub mod anyres;
pub mod compose;
pub mod config;
pub mod family;
pub mod model;
pub mod original;
pub mod processor;
pub mod video;
pub mod weights;

use lmms_ft_core::family::Erased;
use lmms_ft_core::registry::{Status, TrainMode};
use lmms_ft_core::{register_family, register_models};

const MODES: &[TrainMode] = &[TrainMode::Full, TrainMode::Lora, TrainMode::Qlora];

register_family! {
    name: "llava",
    architectures: &["LlavaForConditionalGeneration"],
    model_types: &["llava"],
    modes: MODES,
    status: Status::Implemented,
    implementation: Some(&Erased::<family::Llava>::NEW),
}

register_family! {
    name: "llava-next",
    architectures: &["LlavaNextForConditionalGeneration"],
    model_types: &["llava_next"],
    modes: MODES,
    status: Status::Implemented,
    implementation: Some(&Erased::<family::Llava>::NEW),
}

register_family! {
    name: "llava-next-video",
    architectures: &["LlavaNextVideoForConditionalGeneration"],
    model_types: &["llava_next_video"],
    modes: MODES,
    status: Status::Implemented,
    implementation: Some(&Erased::<family::Llava>::NEW),
}

register_family! {
    name: "llava-onevision",
    architectures: &["LlavaOnevisionForConditionalGeneration"],
    model_types: &["llava_onevision"],
    modes: MODES,
    status: Status::Implemented,
    implementation: Some(&Erased::<family::Llava>::NEW),
}

register_models!(
    "llava",
    [
        (
            "llava-1.5-7b",
            "llava-hf/llava-1.5-7b-hf",
            ["llava-1.5-7b-hf"],
            false
        ),
        (
            "llava-1.5-13b",
            "llava-hf/llava-1.5-13b-hf",
            ["llava-1.5-13b-hf"],
            false
        ),
        (
            "llava-interleave-qwen-0.5b",
            "llava-hf/llava-interleave-qwen-0.5b-hf",
            ["llava-interleave-0.5b"],
            false
        ),
        (
            "llava-interleave-qwen-7b",
            "llava-hf/llava-interleave-qwen-7b-hf",
            ["llava-interleave-7b"],
            false
        ),
    ]
);

register_models!(
    "llava-next",
    [
        (
            "llava-1.6-vicuna-7b",
            "llava-hf/llava-v1.6-vicuna-7b-hf",
            ["llava-next-vicuna-7b"],
            false
        ),
        (
            "llava-1.6-vicuna-13b",
            "llava-hf/llava-v1.6-vicuna-13b-hf",
            ["llava-next-vicuna-13b"],
            false
        ),
        (
            "llava-1.6-mistral-7b",
            "llava-hf/llava-v1.6-mistral-7b-hf",
            ["llava-next-mistral-7b"],
            false
        ),
    ]
);

register_models!(
    "llava-next-video",
    [
        (
            "llava-next-video-7b",
            "llava-hf/LLaVA-NeXT-Video-7B-hf",
            [],
            true
        ),
        (
            "llava-next-video-7b-32k",
            "llava-hf/LLaVA-NeXT-Video-7B-32K-hf",
            [],
            true
        ),
        (
            "llava-next-video-34b",
            "llava-hf/LLaVA-NeXT-Video-34B-hf",
            [],
            true
        ),
    ]
);

register_models!(
    "llava-onevision",
    [
        (
            "llava-onevision-0.5b-ov",
            "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
            ["llava-onevision-0.5b"],
            true
        ),
        (
            "llava-onevision-7b-ov",
            "llava-hf/llava-onevision-qwen2-7b-ov-hf",
            ["llava-onevision-7b"],
            true
        ),
        (
            "llava-onevision-72b-ov",
            "llava-hf/llava-onevision-qwen2-72b-ov-hf",
            ["llava-onevision-72b"],
            true
        ),
    ]
);
