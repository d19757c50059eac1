//! QLoRA on the tiny Llama-3.2-Vision fixture: loading for QLoRA quantises exactly the LLM's
//! linear layers, the cross-attention ones included (not the vision model, the projector or
//! `lm_head`); LoRA training on the 4-bit base tracks LoRA on the dense base; the saved
//! adapter is a plain PEFT adapter of the dense base, which `peft` loads on the
//! unquantised `transformers` model with lmms-ft's LoRA-on-dense logits (≤ 1e-4).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lmms_ft_core::config::{Config, Scheduler};
use lmms_ft_core::family::{Model, Trainable};
use lmms_ft_core::peft::io::{load_adapter, merge_lora, save_adapter, write_safetensors, Blob};
use lmms_ft_core::peft::LoraSpec;
use lmms_ft_core::quant::{load_quantized, QuantSpec};
use lmms_ft_core::testing::{max_abs_diff, run_oracle};
use lmms_ft_core::train::{TrainOptions, Trainer};
use lmms_ft_mllama::model::{Batch, MllamaModel};
use tch::{Device, Kind, Tensor};

const STEPS: u64 = 12;
const SAMPLES: [&str; 4] = ["text", "image", "tiles", "two_images"];

fn dense() -> MllamaModel {
    let fx = common::fixture();
    MllamaModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap()
}

fn batches() -> Vec<Batch> {
    let fx = common::fixture();
    SAMPLES.iter().map(|n| fx.batch(n, "labels")).collect()
}

fn train(model: &mut MllamaModel, batches: &[Batch]) -> (Vec<f64>, LoraSpec) {
    let mut c = Config::default();
    c.train.learning_rate = 5e-3;
    c.train.warmup_ratio = 0.0;
    c.train.scheduler = Scheduler::Constant;
    c.lora.r = 8;
    c.lora.alpha = 16.0;
    c.lora.dropout = 0.0;
    let options = TrainOptions::from_config(&c, STEPS).unwrap();
    let spec = options.lora.clone().unwrap();
    let mut trainer = Trainer::new(model, options).unwrap();
    let losses = (0..STEPS as usize)
        .map(|s| {
            trainer
                .train_step(&[s % batches.len()], |&i| model.forward(&batches[i], true))
                .unwrap()
                .loss
        })
        .collect();
    trainer.set_training(false);
    (losses, spec)
}

fn logits(model: &MllamaModel, batches: &[Batch]) -> BTreeMap<String, Tensor> {
    tch::no_grad(|| {
        SAMPLES
            .iter()
            .zip(batches)
            .map(|(n, b)| (n.to_string(), model.logits(b).unwrap()))
            .collect()
    })
}

#[test]
fn qlora_quantises_cross_attention_trains_and_saves_a_peft_adapter() {
    let fx = common::fixture();
    let batches = batches();
    let spec = QuantSpec::from_config(&Config::default().quant).unwrap();
    let (mut q, done) = load_quantized(Kind::Float, &spec, || {
        MllamaModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float)
    })
    .unwrap();
    assert_eq!(done.quantized, 21, "3 layers × 7 LLM linears quantised");
    let mut names = Vec::new();
    q.visit_linears(&mut |name, l| {
        if l.quant.is_some() {
            names.push(name.to_string());
        }
    });
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("language_model.model.layers.")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.contains(".cross_attn.k_proj")),
        "{names:?}"
    );
    let vars = Trainable::var_store(&q).variables();
    assert!(!vars.contains_key("language_model.model.layers.1.cross_attn.q_proj.weight"));
    assert!(vars.contains_key("vision_model.transformer.layers.0.self_attn.q_proj.weight"));
    assert!(vars.contains_key("multi_modal_projector.weight"));

    let gap = {
        let (a, b) = (logits(&dense(), &batches), logits(&q, &batches));
        a.keys()
            .map(|k| max_abs_diff(&a[k], &b[k]))
            .fold(0.0, f64::max)
    };
    eprintln!("logits gap of the NF4 base vs the dense base: {gap:.3e}");
    assert!(
        gap > 0.0,
        "the quantised base computes exactly the dense one"
    );

    let mut d = dense();
    let (lora, _) = train(&mut d, &batches);
    let (qlora, lora_spec) = train(&mut q, &batches);
    for (i, (a, b)) in lora.iter().zip(&qlora).enumerate() {
        eprintln!("step {:>2}: lora {a:.5}  qlora {b:.5}", i + 1);
    }
    let drop = |l: &[f64]| l[..4].iter().sum::<f64>() - l[8..].iter().sum::<f64>();
    let worst = lora
        .iter()
        .zip(&qlora)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "loss drop lora {:.4}, qlora {:.4}; worst gap {worst:.2e}",
        drop(&lora),
        drop(&qlora)
    );
    assert!(drop(&lora) > 0.05 && drop(&qlora) > 0.05, "both train");
    assert!((drop(&lora) - drop(&qlora)).abs() <= 0.1 * drop(&lora));
    assert!(worst <= 0.05, "QLoRA loss strays {worst} from LoRA's");

    let tmp = tempfile::tempdir().unwrap();
    let (adapter, merged) = (tmp.path().join("adapter"), tmp.path().join("merged"));
    save_adapter(
        &mut q,
        &lora_spec,
        &adapter,
        Some(&fx.dir.display().to_string()),
    )
    .unwrap();
    let mut on_dense = dense();
    load_adapter(&mut on_dense, &adapter, &Arc::new(AtomicBool::new(false))).unwrap();
    let ours = logits(&on_dense, &batches);
    let mut base = dense();
    assert_eq!(
        merge_lora(&mut base, &fx.dir, &adapter, &merged, 1 << 30).unwrap(),
        21
    );
    let path = tmp.path().join("ours.safetensors");
    let blobs: BTreeMap<String, Blob> = ours
        .iter()
        .map(|(k, v)| (k.clone(), Blob::from_tensor(v).unwrap()))
        .collect();
    write_safetensors(&path, &blobs).unwrap();
    let printed = run_oracle(
        "train_peft_check.py",
        &[
            fx.dir.to_str().unwrap(),
            adapter.to_str().unwrap(),
            merged.to_str().unwrap(),
            path.to_str().unwrap(),
        ],
    );
    let r: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    for (name, v) in r.as_object().unwrap() {
        eprintln!("QLoRA adapter on the dense base vs peft, {name}: {v}");
        assert!(v["peft_vs_ours"].as_f64().unwrap() <= 1e-4, "{name}: {v}");
        assert!(v["merged_vs_ours"].as_f64().unwrap() <= 1e-4, "{name}: {v}");
        assert!(
            v["base_vs_ours"].as_f64().unwrap() > 1e-4,
            "{name}: adapter inert: {v}"
        );
    }
}
