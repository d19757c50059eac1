//! The model ids this crate announces to the registry, with their Hub repositories.

use lmms_ft_llava as _;

#[test]
fn registers_its_models() {
    lmms_ft_core::testing::assert_registers_models(
        "lmms_ft_llava",
        &[
            ("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "llava"),
            ("llava-1.5-13b", "llava-hf/llava-1.5-13b-hf", "llava"),
            (
                "llava-1.6-vicuna-7b",
                "llava-hf/llava-v1.6-vicuna-7b-hf",
                "llava-next",
            ),
            (
                "llava-1.6-vicuna-13b",
                "llava-hf/llava-v1.6-vicuna-13b-hf",
                "llava-next",
            ),
            (
                "llava-1.6-mistral-7b",
                "llava-hf/llava-v1.6-mistral-7b-hf",
                "llava-next",
            ),
            (
                "llava-next-video-7b",
                "llava-hf/LLaVA-NeXT-Video-7B-hf",
                "llava-next-video",
            ),
            (
                "llava-next-video-7b-32k",
                "llava-hf/LLaVA-NeXT-Video-7B-32K-hf",
                "llava-next-video",
            ),
            (
                "llava-next-video-34b",
                "llava-hf/LLaVA-NeXT-Video-34B-hf",
                "llava-next-video",
            ),
            (
                "llava-interleave-qwen-0.5b",
                "llava-hf/llava-interleave-qwen-0.5b-hf",
                "llava",
            ),
            (
                "llava-interleave-qwen-7b",
                "llava-hf/llava-interleave-qwen-7b-hf",
                "llava",
            ),
            (
                "llava-onevision-0.5b-ov",
                "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
                "llava-onevision",
            ),
            (
                "llava-onevision-7b-ov",
                "llava-hf/llava-onevision-qwen2-7b-ov-hf",
                "llava-onevision",
            ),
            (
                "llava-onevision-72b-ov",
                "llava-hf/llava-onevision-qwen2-72b-ov-hf",
                "llava-onevision",
            ),
        ],
    );
}
