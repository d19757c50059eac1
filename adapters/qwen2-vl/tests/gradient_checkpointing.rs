//! Gradient checkpointing of every decoder layer and vision block of the tiny Qwen2-VL and
//! Qwen2.5-VL fixtures (written by `transformers` through `scripts/oracle/qwen2_vl_fixture.py`)
//! leaves every gradient as the plain graph computes it (≤ 1e-6, fp32): in full fine-tuning,
//! and with LoRA adapters with dropout on a frozen base, where the first layer's input needs
//! no gradient and the recomputation must replay the dropout masks.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

/// The tests seed and draw from libtorch's global generator, which parallel test threads
/// would otherwise interleave.
static RNG: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

use lmms_ft_core::autograd::recomputations;
use lmms_ft_core::family::{HfConfig, Model, Trainable};
use lmms_ft_core::loss::LossTargets;
use lmms_ft_core::nn::LoraAdapter;
use lmms_ft_core::testing::{cached_fixture, max_abs_diff};
use lmms_ft_qwen2_vl::config::Qwen2VlConfig;
use lmms_ft_qwen2_vl::model::{Batch, Media, Qwen2VlModel};
use lmms_ft_qwen2_vl::rope::{position_ids, RopeSpec};
use tch::{Device, Kind, Tensor};

fn grids(t: Option<&Tensor>) -> Vec<[i64; 3]> {
    let Some(t) = t else { return vec![] };
    let v: Vec<i64> = Vec::try_from(t.flatten(0, -1)).unwrap();
    v.chunks(3).map(|c| [c[0], c[1], c[2]]).collect()
}

/// The fixture's reference batch `name`, built as the parity test does.
fn batch(config: &Qwen2VlConfig, reference: &HashMap<String, Tensor>, name: &str) -> Batch {
    let get = |k: &str| reference.get(&format!("{name}.{k}"));
    let ids_t = get("input_ids").unwrap();
    let ids: Vec<i64> = Vec::try_from(ids_t.flatten(0, -1)).unwrap();
    let image_grids = grids(get("image_grid_thw"));
    let video_grids = grids(get("video_grid_thw"));
    let seconds: Vec<f64> = get("second_per_grid_ts")
        .map(|t| Vec::try_from(t.to_kind(Kind::Double)).unwrap())
        .unwrap_or_else(|| vec![1.0; video_grids.len()]);
    let spec = RopeSpec {
        image_token_id: config.image_token_id,
        video_token_id: config.video_token_id,
        spatial_merge_size: config.vision.spatial_merge_size,
        tokens_per_second: (config.variant == lmms_ft_qwen2_vl::config::Variant::Qwen25Vl)
            .then_some(config.vision.tokens_per_second),
    };
    let pos = position_ids(
        &ids,
        &spec,
        &mut image_grids.clone().into_iter(),
        &mut video_grids.clone().into_iter().zip(seconds),
    )
    .unwrap();
    let labels = get("labels").unwrap();
    let media = |pixels: Option<&Tensor>, grids: Vec<[i64; 3]>| {
        pixels.map(|p| Media {
            pixels: p.shallow_clone(),
            grids,
        })
    };
    Batch {
        input_ids: ids_t.shallow_clone(),
        targets: Some(LossTargets::from_labels(labels).unwrap()),
        position_ids: Tensor::from_slice(&pos.concat()).view([3, 1, -1]),
        images: media(get("pixel_values"), image_grids),
        videos: media(get("pixel_values_videos"), video_grids),
        attention_mask: None,
    }
}

/// Every trainable tensor with its gradient after one seeded forward + backward.
fn gradients(
    model: &mut Qwen2VlModel,
    batch: &Batch,
    checkpointing: bool,
) -> (f64, HashMap<String, Tensor>) {
    let mut trainable: Vec<(String, Tensor)> = Trainable::var_store(model)
        .variables()
        .into_iter()
        .filter(|(_, v)| v.requires_grad())
        .collect();
    Trainable::visit_linears(model, &mut |name, l| {
        if let Some(a) = &l.lora {
            trainable.push((format!("{name}.lora_A"), a.a.shallow_clone()));
            trainable.push((format!("{name}.lora_B"), a.b.shallow_clone()));
        }
    });
    for (_, t) in trainable.iter_mut() {
        t.zero_grad();
    }
    model.set_gradient_checkpointing(checkpointing);
    tch::manual_seed(1234);
    let out = model.forward(batch, true).unwrap();
    let loss = out.mean_loss().unwrap();
    loss.backward();
    let grads = trainable
        .into_iter()
        .map(|(n, t)| {
            let g = t.grad();
            assert!(g.defined(), "{n} received no gradient");
            (n, g.copy())
        })
        .collect();
    (loss.double_value(&[]), grads)
}

fn compare(label: &str, model: &mut Qwen2VlModel, batch: &Batch, blocks: u64) {
    let (loss_plain, plain) = gradients(model, batch, false);
    let before = recomputations();
    let (loss_ckpt, ckpt) = gradients(model, batch, true);
    assert!(
        recomputations() - before >= blocks,
        "{label}: expected at least {blocks} recomputed blocks"
    );
    assert!(
        (loss_plain - loss_ckpt).abs() <= 1e-6,
        "{label}: loss {loss_plain} vs {loss_ckpt}"
    );
    assert_eq!(plain.len(), ckpt.len());
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
        "{label}: {} gradients equal, loss {loss_plain:.6}",
        plain.len()
    );
}

fn check_variant(variant: &str) {
    let (out, _) = cached_fixture("qwen2_vl_fixture.py", variant);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let config = Qwen2VlConfig::from_hf_json(&json).unwrap();
    let reference: HashMap<String, Tensor> =
        Tensor::read_safetensors(out.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let mut model = Qwen2VlModel::load(&config, &out, Device::Cpu, Kind::Float).unwrap();
    let blocks = (config.text.num_layers + config.vision.depth) as u64;
    let samples = ["image", "video"];
    for name in samples {
        compare(
            &format!("{variant}/{name}/full"),
            &mut model,
            &batch(&config, &reference, name),
            blocks,
        );
    }

    // LoRA with dropout on every linear layer, base frozen.
    for (_, v) in Trainable::var_store(&model).variables() {
        let _ = v.set_requires_grad(false);
    }
    let training = Arc::new(AtomicBool::new(true));
    tch::manual_seed(99);
    Trainable::visit_linears(&mut model, &mut |_, l| {
        let (inp, outp) = (l.in_features(), l.out_features());
        l.lora = Some(LoraAdapter {
            a: (Tensor::randn([4, inp], (Kind::Float, Device::Cpu)) * 0.2).set_requires_grad(true),
            // Non-zero B so the adapters (and their dropout) change the forward pass.
            b: (Tensor::randn([outp, 4], (Kind::Float, Device::Cpu)) * 0.2).set_requires_grad(true),
            scaling: 2.0,
            dropout: 0.2,
            training: training.clone(),
        });
    });
    for name in samples {
        compare(
            &format!("{variant}/{name}/lora"),
            &mut model,
            &batch(&config, &reference, name),
            blocks,
        );
    }
}

#[test]
fn qwen2_vl_checkpointed_gradients_match() {
    let _serial = serial();
    check_variant("qwen2_vl");
}

#[test]
fn qwen2_5_vl_checkpointed_gradients_match() {
    let _serial = serial();
    check_variant("qwen2_5_vl");
}
