//! The model ids this crate announces to the registry, with their Hub repositories.

use lmms_ft_phi3_v as _;

#[test]
fn registers_its_models() {
    lmms_ft_core::testing::assert_registers_models(
        "lmms_ft_phi3_v",
        &[
            ("phi3-v", "microsoft/Phi-3-vision-128k-instruct", "phi3-v"),
            ("phi3.5-v", "microsoft/Phi-3.5-vision-instruct", "phi3-v"),
        ],
    );
}
