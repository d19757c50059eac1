//! The model ids this crate announces to the registry, with their Hub repositories.

use lmms_ft_qwen2_vl as _;

#[test]
fn registers_its_models() {
    lmms_ft_core::testing::assert_registers_models(
        "lmms_ft_qwen2_vl",
        &[
            (
                "qwen2-vl-2b-instruct",
                "Qwen/Qwen2-VL-2B-Instruct",
                "qwen2-vl",
            ),
            (
                "qwen2-vl-7b-instruct",
                "Qwen/Qwen2-VL-7B-Instruct",
                "qwen2-vl",
            ),
            (
                "qwen2-vl-72b-instruct",
                "Qwen/Qwen2-VL-72B-Instruct",
                "qwen2-vl",
            ),
            (
                "qwen2.5-vl-3b-instruct",
                "Qwen/Qwen2.5-VL-3B-Instruct",
                "qwen2.5-vl",
            ),
            (
                "qwen2.5-vl-7b-instruct",
                "Qwen/Qwen2.5-VL-7B-Instruct",
                "qwen2.5-vl",
            ),
            (
                "qwen2.5-vl-72b-instruct",
                "Qwen/Qwen2.5-VL-72B-Instruct",
                "qwen2.5-vl",
            ),
        ],
    );
}
