//! What Qwen3-VL training writes, on the tiny fixture checkpoint:
//! - a trained adapter, saved in PEFT layout, loads in `peft` on the transformers model with
//!   lmms-ft's logits (≤ 1e-4) while changing the base model's; merged into the base and saved,
//!   the full checkpoint loads in `transformers` with the same logits;
//! - after full fine-tuning steps, the saved sharded HF checkpoint loads in `transformers`
//!   with lmms-ft's logits;
//! - QLoRA quantises exactly the LLM's linears and trains (the loss falls), and its adapter
//!   loads on the dense base.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use common::{fixture, SAMPLES};
use lmms_ft_core::config::{Config, Mode, Scheduler};
use lmms_ft_core::family::{Model, Trainable};
use lmms_ft_core::peft::io::{
    copy_model_files, load_adapter, merge_lora, read_safetensors, save_adapter, save_hf_weights,
    write_safetensors, Blob,
};
use lmms_ft_core::quant::{load_quantized, QuantSpec};
use lmms_ft_core::testing::{max_abs_diff, run_oracle};
use lmms_ft_core::train::{TrainOptions, Trainer};
use lmms_ft_qwen3_vl::model::{Batch, Qwen3VlModel};
use tch::{Device, Kind, Tensor};

fn dense() -> Qwen3VlModel {
    let fx = fixture();
    Qwen3VlModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap()
}

fn batches() -> Vec<Batch> {
    SAMPLES.iter().map(|n| fixture().batch(n)).collect()
}

/// Trains LoRA for `steps` steps over the four samples in turn; returns the losses.
fn train(model: &mut Qwen3VlModel, steps: u64) -> (Vec<f64>, lmms_ft_core::peft::LoraSpec) {
    let batches = batches();
    let mut c = Config::default();
    c.train.learning_rate = 1e-2;
    c.train.warmup_ratio = 0.0;
    c.train.scheduler = Scheduler::Constant;
    c.lora.r = 4;
    c.lora.alpha = 8.0;
    c.lora.dropout = 0.0;
    let options = TrainOptions::from_config(&c, steps).unwrap();
    let spec = options.lora.clone().unwrap();
    let mut trainer = Trainer::new(model, options).unwrap();
    let losses = (0..steps as usize)
        .map(|s| {
            trainer
                .train_step(&[s % 4], |&i| model.forward(&batches[i], true))
                .unwrap()
                .loss
        })
        .collect();
    trainer.set_training(false);
    (losses, spec)
}

const CHECKED: [&str; 3] = ["text", "image", "video"];

fn logits(model: &Qwen3VlModel) -> BTreeMap<String, Tensor> {
    let fx = fixture();
    tch::no_grad(|| {
        CHECKED
            .iter()
            .map(|&n| (n.to_string(), model.logits(&fx.batch(n)).unwrap()))
            .collect()
    })
}

/// `train_peft_check.py`: peft's logits with the adapter, the base's, and the merged
/// checkpoint's in transformers, each against `ours`.
fn peft_check(
    adapter: &std::path::Path,
    merged: &std::path::Path,
    ours: &BTreeMap<String, Tensor>,
) -> serde_json::Value {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.safetensors");
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
    serde_json::from_str(printed.lines().last().unwrap()).unwrap()
}

#[test]
fn adapter_loads_in_peft_and_merged_model_in_transformers() {
    let fx = fixture();
    let mut model = dense();
    let (_, spec) = train(&mut model, 3);
    let tmp = tempfile::tempdir().unwrap();
    let (adapter, merged) = (tmp.path().join("adapter"), tmp.path().join("merged"));
    save_adapter(&mut model, &spec, &adapter, None).unwrap();
    let keys = read_safetensors(&adapter.join("adapter_model.safetensors")).unwrap();
    for key in [
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.language_model.layers.1.mlp.down_proj.lora_B.weight",
    ] {
        assert!(keys.contains_key(key), "adapter lacks {key}");
        assert!(
            keys[key].abs().max().double_value(&[]) > 0.0,
            "{key} is zero: the check would pass vacuously"
        );
    }
    let ours = logits(&model);
    let mut base = dense();
    // 20 MB shards split the 40 MB checkpoint.
    let n = merge_lora(&mut base, &fx.dir, &adapter, &merged, 20 << 20).unwrap();
    assert_eq!(n, 14, "2 layers × 7 linear layers merged");
    assert!(merged.join("model.safetensors.index.json").is_file());
    for (name, theirs) in logits(&base) {
        let d = max_abs_diff(&theirs, &ours[&name]);
        assert!(d <= 1e-4, "{name}: merged model in lmms-ft differs by {d}");
    }
    let r = peft_check(&adapter, &merged, &ours);
    for name in CHECKED {
        let v = &r[name];
        eprintln!("{name}: {v}");
        assert!(v["peft_vs_ours"].as_f64().unwrap() <= 1e-4, "{name}: {v}");
        assert!(v["merged_vs_ours"].as_f64().unwrap() <= 1e-4, "{name}: {v}");
        assert!(
            v["base_vs_ours"].as_f64().unwrap() > 1e-3,
            "{name}: adapter inert: {v}"
        );
    }
}

#[test]
fn qlora_quantises_the_llm_and_trains() {
    let fx = fixture();
    let spec = QuantSpec::from_config(&Config::default().quant).unwrap();
    let (mut q, done) = load_quantized(Kind::Float, &spec, || {
        Qwen3VlModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float)
    })
    .unwrap();
    assert_eq!(done.quantized, 14, "2 layers × 7 LLM linears quantised");
    let mut quantised = Vec::new();
    q.visit_linears(&mut |name, l| {
        if l.quant.is_some() {
            quantised.push(name.to_string());
        }
    });
    assert!(
        quantised
            .iter()
            .all(|n| n.starts_with("model.language_model.layers.")),
        "{quantised:?}"
    );
    let (losses, lora) = train(&mut q, 12);
    let first: f64 = losses[..4].iter().sum();
    let last: f64 = losses[8..].iter().sum();
    eprintln!("QLoRA losses {losses:?}");
    assert!(
        losses.iter().all(|l| l.is_finite()) && last < first - 0.1,
        "QLoRA does not train: {losses:?}"
    );
    let tmp = tempfile::tempdir().unwrap();
    save_adapter(&mut q, &lora, tmp.path(), None).unwrap();
    let mut on_dense = dense();
    load_adapter(&mut on_dense, tmp.path(), &Arc::new(AtomicBool::new(false))).unwrap();
    let base = logits(&dense());
    let adapted = logits(&on_dense);
    let moved = max_abs_diff(&base["image"], &adapted["image"]);
    assert!(moved > 1e-3, "the QLoRA adapter changes nothing ({moved})");
}

#[test]
fn full_fine_tuning_output_loads_in_transformers() {
    let fx = fixture();
    let batches = batches();
    let mut model = dense();
    let mut c = Config::default();
    c.train.mode = Mode::Full;
    c.train.learning_rate = 1e-3;
    c.train.warmup_ratio = 0.0;
    c.train.scheduler = Scheduler::Constant;
    let options = TrainOptions::from_config(&c, 2).unwrap();
    let mut trainer = Trainer::new(&mut model, options).unwrap();
    for i in 0..2 {
        trainer
            .train_step(&[i + 1], |&i| model.forward(&batches[i], true))
            .unwrap();
    }
    trainer.set_training(false);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("full");
    save_hf_weights(&model, &out, 20 << 20).unwrap();
    copy_model_files(&fx.dir, &out).unwrap();
    assert!(out.join("model.safetensors.index.json").is_file());
    let ours = logits(&model);
    let path = tmp.path().join("ours.safetensors");
    let blobs: BTreeMap<String, Blob> = ours
        .iter()
        .map(|(k, v)| (k.clone(), Blob::from_tensor(v).unwrap()))
        .collect();
    write_safetensors(&path, &blobs).unwrap();
    let printed = run_oracle(
        "train_full_check.py",
        &[
            fx.dir.to_str().unwrap(),
            out.to_str().unwrap(),
            path.to_str().unwrap(),
        ],
    );
    let r: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    for name in CHECKED {
        let v = &r[name];
        eprintln!("full fine-tuning {name}: {v}");
        assert!(v["hf_vs_ours"].as_f64().unwrap() <= 1e-4, "{name}: {v}");
        assert!(
            v["base_vs_ours"].as_f64().unwrap() > 1e-3,
            "{name}: training changed nothing: {v}"
        );
    }
}
