//! Gradient checkpointing of every decoder layer and vision block of the LLaVA models
//! (`Trainable::set_gradient_checkpointing`) leaves the loss and every parameter's gradient as
//! the plain graph computes them (≤ 1e-6, fp32), on the tiny NeXT-Video (CLIP + Llama) and
//! OneVision (SigLIP + Qwen2) fixtures written by transformers, for an image and a video
//! sample; and the blocks really are recomputed (the shim's counter rises by at least the
//! number of blocks run). With the tower frozen, its blocks are not checkpointed (nothing in
//! them needs a gradient) and the decoder's gradients still match.

use std::collections::HashMap;

use lmms_ft_core::autograd::recomputations;
use lmms_ft_core::family::{Model, Trainable};
use lmms_ft_core::testing::max_abs_diff;
use lmms_ft_llava::config::VisionConfig;
use lmms_ft_llava::model::{Batch, LlavaModel};
use tch::{Device, Kind, Tensor};

mod common;

/// Loss and the gradient of every trainable variable after one forward + backward.
fn gradients(model: &mut LlavaModel, batch: &Batch, on: bool) -> (f64, HashMap<String, Tensor>) {
    let vars: Vec<(String, Tensor)> = Trainable::var_store(model)
        .variables()
        .into_iter()
        .filter(|(_, v)| v.requires_grad())
        .collect();
    for (_, v) in &vars {
        let mut v = v.shallow_clone();
        v.zero_grad();
    }
    model.set_gradient_checkpointing(on);
    let out = model.forward(batch, true).unwrap();
    let loss = out.mean_loss().unwrap();
    loss.backward();
    let grads = vars
        .into_iter()
        .filter_map(|(n, v)| {
            let g = v.grad();
            g.defined().then(|| (n, g.copy()))
        })
        .collect();
    (loss.double_value(&[]), grads)
}

fn compare(label: &str, model: &mut LlavaModel, batch: &Batch, blocks: u64) {
    let (loss_plain, plain) = gradients(model, batch, false);
    let before = recomputations();
    let (loss_ckpt, ckpt) = gradients(model, batch, true);
    let recomputed = recomputations() - before;
    assert!(
        recomputed >= blocks,
        "{label}: {recomputed} blocks recomputed, expected at least {blocks}"
    );
    assert!(
        (loss_plain - loss_ckpt).abs() <= 1e-6,
        "{label}: loss {loss_plain} vs {loss_ckpt}"
    );
    assert_eq!(plain.len(), ckpt.len(), "{label}: gradients present");
    let mut nonzero = 0;
    for (name, g) in &plain {
        let d = max_abs_diff(g, &ckpt[name]);
        assert!(d <= 1e-6, "{label}: gradient of {name} differs by {d}");
        if g.abs().max().double_value(&[]) > 0.0 {
            nonzero += 1;
        }
    }
    assert!(
        nonzero * 2 > plain.len(),
        "{label}: most gradients are zero"
    );
    eprintln!(
        "{label}: {} gradients equal, {recomputed} blocks recomputed, loss {loss_plain:.6}",
        plain.len()
    );
}

fn check(variant: &str) {
    let fx = common::fixture(variant);
    let config = &fx.config;
    let mut model = LlavaModel::load(config, fx.dir(), Device::Cpu, Kind::Float).unwrap();
    let tower_layers = match &config.vision {
        VisionConfig::Clip(c) => c.encoder.num_layers,
        VisionConfig::Siglip(c) => c.encoder.num_layers,
    };
    // Blocks run: the decoder's, and the tower's up to the deepest feature layer.
    let deepest = config
        .vision_feature_layers
        .iter()
        .map(|&i| if i < 0 { tower_layers + 1 + i } else { i })
        .max()
        .unwrap();
    let blocks = (config.text.decoder.num_layers + deepest) as u64;
    for name in ["image", "video"] {
        compare(
            &format!("{variant}/{name}/full"),
            &mut model,
            &fx.batch(name),
            blocks,
        );
    }
    for (name, v) in Trainable::var_store(&model).variables() {
        if name.starts_with("vision_tower.") {
            let _ = v.set_requires_grad(false);
        }
    }
    compare(
        &format!("{variant}/video/frozen-tower"),
        &mut model,
        &fx.batch("video"),
        config.text.decoder.num_layers as u64,
    );
}

#[test]
fn next_video_checkpointing_keeps_gradients() {
    check("next_video");
}

#[test]
fn onevision_checkpointing_keeps_gradients() {
    check("onevision");
}
