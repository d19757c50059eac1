//! The model ids this crate announces to the registry, with their Hub repositories.

use lmms_ft_qwen3_vl as _;

#[test]
fn registers_its_models() {
    lmms_ft_core::testing::assert_registers_models(
        "lmms_ft_qwen3_vl",
        &[
            (
                "qwen3-vl-2b-instruct",
                "Qwen/Qwen3-VL-2B-Instruct",
                "qwen3-vl",
            ),
            (
                "qwen3-vl-2b-thinking",
                "Qwen/Qwen3-VL-2B-Thinking",
                "qwen3-vl",
            ),
            (
                "qwen3-vl-4b-instruct",
                "Qwen/Qwen3-VL-4B-Instruct",
                "qwen3-vl",
            ),
            (
                "qwen3-vl-4b-thinking",
                "Qwen/Qwen3-VL-4B-Thinking",
                "qwen3-vl",
            ),
            (
                "qwen3-vl-8b-instruct",
                "Qwen/Qwen3-VL-8B-Instruct",
                "qwen3-vl",
            ),
            (
                "qwen3-vl-8b-thinking",
                "Qwen/Qwen3-VL-8B-Thinking",
                "qwen3-vl",
            ),
            (
                "qwen3-vl-32b-instruct",
                "Qwen/Qwen3-VL-32B-Instruct",
                "qwen3-vl",
            ),
            (
                "qwen3-vl-32b-thinking",
                "Qwen/Qwen3-VL-32B-Thinking",
                "qwen3-vl",
            ),
        ],
    );
}
