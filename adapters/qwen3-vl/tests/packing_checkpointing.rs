//! Two training mechanisms on the tiny Qwen3-VL fixture, where DeepStack adds vision features
//! between decoder layers:
//! - `data.packing`: the text, image, two-image and video conversations packed into shared
//!   rows (M-RoPE positions restarting per sample, attention confined to each sample, the
//!   DeepStack features landing at each sample's own visual positions) give the loss and every
//!   gradient of the same conversations padded into a batch, in one row and in several;
//! - gradient checkpointing of every decoder layer and vision block leaves the loss and every
//!   parameter's gradient as the plain graph computes them (≤ 1e-6, fp32), the DeepStack
//!   mergers included.

mod common;

use std::collections::HashMap;

use common::{fixture, SAMPLES};
use lmms_ft_core::autograd::recomputations;
use lmms_ft_core::family::{
    DynFamily, Erased, Model, OpenOptions, PreparedConversation, Trainable,
};
use lmms_ft_core::testing::{assert_packing_matches_padding_in_rows, max_abs_diff};
use lmms_ft_qwen3_vl::family::Qwen3Vl;
use lmms_ft_qwen3_vl::model::{Batch, Qwen3VlModel};
use tch::{Device, Kind, Tensor};

#[test]
fn packed_equals_padded() {
    let fx = fixture();
    let samples: Vec<PreparedConversation> = SAMPLES
        .iter()
        .map(|&name| PreparedConversation {
            conversation: fx.conversation(name),
            media: fx.media(name),
        })
        .collect();
    let pipeline = Erased::<Qwen3Vl>::NEW
        .open(
            &fx.dir,
            OpenOptions {
                device: Device::Cpu,
                kind: Kind::Float,
                processor: Default::default(),
            },
            None,
        )
        .unwrap();
    assert_packing_matches_padding_in_rows(pipeline.as_ref(), &samples, "qwen3-vl");
}

/// Loss and every parameter's gradient after one forward + backward.
fn gradients(
    model: &mut Qwen3VlModel,
    batch: &Batch,
    checkpointing: bool,
) -> (f64, HashMap<String, Tensor>) {
    let vars = Trainable::var_store(model).variables();
    for (_, v) in vars.iter() {
        let mut v = v.shallow_clone();
        v.zero_grad();
    }
    model.set_gradient_checkpointing(checkpointing);
    let loss = model.forward(batch, true).unwrap().mean_loss().unwrap();
    loss.backward();
    let grads = vars
        .into_iter()
        .map(|(n, t)| {
            let g = t.grad();
            assert!(g.defined(), "{n} received no gradient");
            (n, g.copy())
        })
        .collect();
    (loss.double_value(&[]), grads)
}

#[test]
fn checkpointed_gradients_match() {
    let fx = fixture();
    let mut model = Qwen3VlModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap();
    let blocks = (fx.config.text.num_layers + fx.config.vision.depth) as u64;
    for name in ["image", "video"] {
        let batch = fx.batch(name);
        let (loss_plain, plain) = gradients(&mut model, &batch, false);
        let before = recomputations();
        let (loss_ckpt, ckpt) = gradients(&mut model, &batch, true);
        assert!(
            recomputations() - before >= blocks,
            "{name}: expected at least {blocks} recomputed blocks"
        );
        assert!(
            (loss_plain - loss_ckpt).abs() <= 1e-6,
            "{name}: loss {loss_plain} vs {loss_ckpt}"
        );
        let mut nonzero = 0;
        for (param, g) in &plain {
            let d = max_abs_diff(g, &ckpt[param]);
            assert!(d <= 1e-6, "{name}: gradient of {param} differs by {d}");
            if g.abs().max().double_value(&[]) > 0.0 {
                nonzero += 1;
            }
        }
        assert!(nonzero * 2 > plain.len(), "{name}: most gradients are zero");
        let deepstack = &plain["model.visual.deepstack_merger_list.0.linear_fc1.weight"];
        assert!(deepstack.abs().max().double_value(&[]) > 0.0);
        eprintln!(
            "{name}: {} gradients equal with checkpointing, loss {loss_plain:.6}",
            plain.len()
        );
    }
}
