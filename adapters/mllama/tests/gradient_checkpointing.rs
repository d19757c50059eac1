//! Gradient checkpointing of every text layer (self- and cross-attention) and every vision
//! encoder layer (local and global) of the tiny Llama-3.2-Vision fixture leaves every
//! gradient as the plain graph computes it (≤ 1e-6 relative to the gradient's norm, fp32),
//! and the layers are really recomputed.

mod common;

use lmms_ft_core::autograd::recomputations;
use lmms_ft_core::family::{Model, Trainable};
use lmms_ft_mllama::model::MllamaModel;
use tch::{Device, Kind, Tensor};

fn grads(model: &MllamaModel, name: &str) -> Vec<(String, Tensor)> {
    let fx = common::fixture();
    for (_, mut v) in model.var_store().variables() {
        v.zero_grad();
    }
    let out = model.forward(&fx.batch(name, "labels"), true).unwrap();
    out.mean_loss().unwrap().backward();
    let mut g: Vec<(String, Tensor)> = model
        .var_store()
        .variables()
        .into_iter()
        .filter(|(_, v)| v.grad().defined())
        .map(|(k, v)| (k, v.grad().copy()))
        .collect();
    g.sort_by(|a, b| a.0.cmp(&b.0));
    g
}

#[test]
fn checkpointed_gradients_equal_plain_ones() {
    let fx = common::fixture();
    let mut model = MllamaModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap();
    for name in ["text", "two_images"] {
        model.set_gradient_checkpointing(false);
        let plain = grads(&model, name);
        model.set_gradient_checkpointing(true);
        let before = recomputations();
        let ckpt = grads(&model, name);
        let replayed = recomputations() - before;
        // text: 2 self-attention layers (cross-attention is skipped without images);
        // two_images: 3 text layers + 3 local + 2 global vision layers.
        let expected = if name == "text" { 2 } else { 8 };
        assert!(replayed >= expected, "{name}: {replayed} layers recomputed");
        assert_eq!(
            plain.iter().map(|p| &p.0).collect::<Vec<_>>(),
            ckpt.iter().map(|p| &p.0).collect::<Vec<_>>(),
            "{name}: parameters with gradients"
        );
        let scale = plain
            .iter()
            .map(|(_, g)| g.norm().double_value(&[]).powi(2))
            .sum::<f64>()
            .sqrt();
        for ((k, a), (_, b)) in plain.iter().zip(&ckpt) {
            let err = (a - b).norm().double_value(&[]);
            assert!(
                err <= 1e-6 * scale,
                "{name}: gradient of {k} differs by {err:.2e} (norm {scale:.2e})"
            );
        }
        eprintln!(
            "{name}: {} gradients equal, {replayed} layers recomputed",
            plain.len()
        );
    }
}
