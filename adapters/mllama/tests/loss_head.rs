//! The core's chunked loss head on the tiny Llama-3.2-Vision checkpoint: for the text, image
//! and two-image samples the summed loss and every parameter's gradient equal those of the
//! full-vocabulary logits (fp64, and the image sample in fp32; tolerances in
//! `assert_loss_head_matches_full_logits`).

mod common;

use lmms_ft_core::testing::assert_loss_head_matches_full_logits;
use lmms_ft_mllama::model::MllamaModel;
use tch::{Device, Kind};

#[test]
fn loss_head_matches_full_logits() {
    let fx = common::fixture();
    for (kind, names) in [
        (Kind::Double, &["text", "image", "two_images"][..]),
        (Kind::Float, &["image"][..]),
    ] {
        let model = MllamaModel::load(&fx.config, &fx.dir, Device::Cpu, kind).unwrap();
        for name in names {
            let batch = fx.batch(name, "labels");
            let labels = &fx.reference[&format!("{name}.labels")];
            assert_loss_head_matches_full_logits(
                &model,
                &batch,
                labels,
                &format!("{kind:?}/{name}"),
            );
        }
    }
}
