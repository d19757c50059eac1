//! LoRA training parity with `transformers` + `peft` + a plain PyTorch AdamW loop
//! (`scripts/oracle/train_mllama.py`, the loop of `train_loop.py`) on the tiny
//! Llama-3.2-Vision checkpoint: the oracle's random, non-zero initial adapter loaded from
//! its PEFT files (self-attention, cross-attention and MLP linears of the LLM), the
//! projector trained fully at its own learning rate, the same four samples cycled in the
//! same order, weight decay off for biases, 2 warm-up steps + cosine, clipping at 1.0. Ten
//! optimiser steps must give per-step losses within 1e-5 relative, the same learning rates
//! and gradient norms, the same trainable tensors, and final weights that agree.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lmms_ft_core::config::{ComponentMode, Config, Mode, Scheduler};
use lmms_ft_core::family::Model;
use lmms_ft_core::peft::io::{load_adapter, read_safetensors};
use lmms_ft_core::testing::{max_abs_diff, run_oracle};
use lmms_ft_core::train::{TrainOptions, Trainer};
use lmms_ft_mllama::model::MllamaModel;
use tch::{Device, Kind};

const STEPS: u64 = 10;
const SAMPLES: [&str; 4] = ["text", "image", "tiles", "two_images"];

fn check(accum: usize) {
    let fx = common::fixture();
    let batches: Vec<_> = SAMPLES.iter().map(|n| fx.batch(n, "labels")).collect();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora");
    let printed = run_oracle(
        "train_mllama.py",
        &[
            fx.dir.to_str().unwrap(),
            out.to_str().unwrap(),
            "lora",
            &accum.to_string(),
            &STEPS.to_string(),
        ],
    );
    let oracle: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();

    let mut model = MllamaModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap();
    load_adapter(
        &mut model,
        &out.join("init_adapter"),
        &Arc::new(AtomicBool::new(true)),
    )
    .unwrap();
    let mut c = Config::default();
    let t = &mut c.train;
    t.mode = Mode::Lora;
    t.learning_rate = 1e-3;
    t.vision_lr = Some(2e-3);
    t.projector_lr = Some(5e-4);
    t.weight_decay = 0.1;
    t.warmup_ratio = 0.2; // ceil(0.2 · 10) = 2 warm-up steps
    t.scheduler = Scheduler::Cosine;
    t.max_grad_norm = 1.0;
    t.projector = Some(ComponentMode::Full);
    c.lora.r = 4;
    c.lora.alpha = 8.0;
    c.lora.dropout = 0.0;
    let options = TrainOptions::from_config(&c, STEPS).unwrap();
    let mut trainer = Trainer::new(&mut model, options).unwrap();
    let cross = trainer
        .params
        .iter()
        .filter(|p| p.name.contains(".cross_attn.") && p.name.contains(".lora_"))
        .count();
    assert_eq!(cross, 8, "cross-attention q/k/v/o × (A, B)");
    assert_eq!(
        trainer.num_trainable(),
        oracle["trainable"].as_i64().unwrap(),
        "trainable scalars"
    );
    for s in 0..STEPS as usize {
        let micro: Vec<usize> = (0..accum).map(|j| (s * accum + j) % batches.len()).collect();
        let stats = trainer
            .train_step(&micro, |&i| model.forward(&batches[i], true))
            .unwrap();
        let (loss, lr, norm) = (
            oracle["loss"][s].as_f64().unwrap(),
            oracle["lr"][s].as_f64().unwrap(),
            oracle["grad_norm"][s].as_f64().unwrap(),
        );
        let rel = ((stats.loss - loss) / loss).abs();
        eprintln!(
            "accum {accum} step {}: loss {:.7} vs {loss:.7} (rel {rel:.1e}), grad norm {:.6} vs {norm:.6}",
            stats.step, stats.loss, stats.grad_norm
        );
        assert!(rel <= 1e-5, "step {}: loss {} vs {loss}", stats.step, stats.loss);
        assert!((stats.lr - lr).abs() <= 1e-12, "step {}: lr {} vs {lr}", stats.step, stats.lr);
        assert!(
            ((stats.grad_norm - norm) / norm).abs() <= 1e-4,
            "step {}: grad norm {} vs {norm}",
            stats.step,
            stats.grad_norm
        );
    }
    let theirs = read_safetensors(&out.join("final.safetensors")).unwrap();
    let ours: BTreeMap<&str, _> = trainer
        .params
        .iter()
        .map(|p| (p.name.as_str(), &p.tensor))
        .collect();
    assert_eq!(
        ours.keys().copied().collect::<Vec<_>>(),
        theirs.keys().map(String::as_str).collect::<Vec<_>>(),
        "trainable tensors"
    );
    let worst = theirs
        .iter()
        .map(|(k, v)| max_abs_diff(ours[k.as_str()], v))
        .fold(0.0, f64::max);
    eprintln!("accum {accum}: final weights max diff {worst:.2e}");
    assert!(worst <= 1e-5, "final weights differ by {worst}");
}

#[test]
fn train_lora_matches_peft() {
    check(1);
}

#[test]
fn train_lora_grad_accum_2_matches_peft() {
    check(2);
}
