//! The core's chunked loss head on every LLaVA variant (the tiny checkpoints transformers
//! writes): for each fixture sample, the summed loss and every parameter's gradient equal
//! those of the full-vocabulary logits (fp64 and fp32 models, tolerances in
//! `assert_loss_head_matches_full_logits`), with the head trained and frozen, in one chunk and
//! in many.

use lmms_ft_core::testing::assert_loss_head_matches_full_logits;
use lmms_ft_llava::model::LlavaModel;
use tch::{Device, Kind};

mod common;

fn check(variant: &str) {
    let fx = common::fixture(variant);
    // Every sample in fp64 (exact up to rounding), the image sample in fp32 too.
    for (kind, samples) in [(Kind::Double, usize::MAX), (Kind::Float, 2)] {
        let model = LlavaModel::load(&fx.config, fx.dir(), Device::Cpu, kind).unwrap();
        for name in fx
            .sample_names()
            .iter()
            .take(samples)
            .skip(usize::from(samples == 2))
        {
            let batch = fx.batch(name);
            let labels = fx.get(name, "labels").unwrap();
            assert_loss_head_matches_full_logits(
                &model,
                &batch,
                labels,
                &format!("{variant}/{name}"),
            );
        }
    }
}

#[test]
fn llava_1_5_loss_head_matches_full_logits() {
    check("llava");
}

#[test]
fn llava_interleave_loss_head_matches_full_logits() {
    check("interleave");
}

#[test]
fn llava_next_vicuna_loss_head_matches_full_logits() {
    check("next_vicuna");
}

#[test]
fn llava_next_mistral_loss_head_matches_full_logits() {
    check("next_mistral");
}

#[test]
fn llava_next_video_loss_head_matches_full_logits() {
    check("next_video");
}

#[test]
fn llava_onevision_loss_head_matches_full_logits() {
    check("onevision");
}
