//! The core's chunked loss head on Qwen2-VL and Qwen2.5-VL (the tiny checkpoints transformers
//! writes): for the text, image, two-image and video samples, the summed loss and every
//! parameter's gradient equal those of the full-vocabulary logits (fp32, ≤ 1e-6 relative),
//! with the head trained and frozen, in one chunk and in many.

use lmms_ft_core::testing::{assert_loss_head_matches_full_logits, cached_fixture};
use lmms_ft_qwen2_vl::model::Qwen2VlModel;
use tch::{Device, Kind, Tensor};

mod common;

fn check(variant: &str) {
    let fx = common::load(cached_fixture("qwen2_vl_fixture.py", variant).0);
    let model = Qwen2VlModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap();
    let reference: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(fx.dir.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    for (name, batch) in ["text", "image", "two_images", "video"]
        .iter()
        .zip(&fx.batches)
    {
        let labels = &reference[&format!("{name}.labels")];
        assert_loss_head_matches_full_logits(&model, batch, labels, &format!("{variant}/{name}"));
    }
}

#[test]
fn qwen2_vl_loss_head_matches_full_logits() {
    check("qwen2_vl");
}

#[test]
fn qwen2_5_vl_loss_head_matches_full_logits() {
    check("qwen2_5_vl");
}
