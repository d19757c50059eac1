//! The model ids this crate announces to the registry, with their Hub repositories.

use lmms_ft_mllama as _;

#[test]
fn registers_its_models() {
    lmms_ft_core::testing::assert_registers_models(
        "lmms_ft_mllama",
        &[
            (
                "llama-3.2-11b-vision-instruct",
                "meta-llama/Llama-3.2-11B-Vision-Instruct",
                "llama-3.2-vision",
            ),
            (
                "llama-3.2-90b-vision-instruct",
                "meta-llama/Llama-3.2-90B-Vision-Instruct",
                "llama-3.2-vision",
            ),
        ],
    );
}
