//! The core's chunked loss head on Qwen2-VL and Qwen2.5-VL (the tiny checkpoints transformers
//! writes): for the text, image, two-image and video samples, the summed loss and every
//! parameter's gradient equal those of the full-vocabulary logits (fp64 and fp32 models, tolerances in
//! `assert_loss_head_matches_full_logits`),
//! with the head trained and frozen, in one chunk and in many.

use lmms_ft_core::testing::{assert_loss_head_matches_full_logits, cached_fixture};
use lmms_ft_qwen2_vl::model::Qwen2VlModel;
use tch::{Device, Kind, Tensor};

mod common;

fn check(variant: &str, fx: &common::Fixture) {
    // Every sample in fp64 (exact up to rounding), the image sample in fp32 too.
    for (kind, samples) in [(Kind::Double, 4), (Kind::Float, 2)] {
        let model = Qwen2VlModel::load(&fx.config, &fx.dir, Device::Cpu, kind).unwrap();
        check_model(variant, fx, &model, samples);
    }
}

fn check_model(variant: &str, fx: &common::Fixture, model: &Qwen2VlModel, samples: usize) {
    let reference: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(fx.dir.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let names = ["text", "image", "two_images", "video"];
    let skip = usize::from(samples == 2);
    for (name, batch) in names.iter().zip(&fx.batches).take(samples).skip(skip) {
        let labels = &reference[&format!("{name}.labels")];
        assert_loss_head_matches_full_logits(model, batch, labels, &format!("{variant}/{name}"));
    }
}

#[test]
fn qwen2_vl_loss_head_matches_full_logits() {
    check("qwen2_vl", common::fixture());
}

#[test]
fn qwen2_5_vl_loss_head_matches_full_logits() {
    let fx = common::load(cached_fixture("qwen2_vl_fixture.py", "qwen2_5_vl").0);
    check("qwen2_5_vl", &fx);
}
