//! Training parity with `transformers` + `peft` + a plain PyTorch AdamW loop
//! (`scripts/oracle/train_qwen2_vl.py`) on the tiny Qwen2-VL checkpoint: same initial
//! weights (the LoRA case loads the oracle's random, non-zero initial adapter from its PEFT
//! files), same four samples cycled in the same order, same hyper-parameters (per-part
//! learning rates, weight decay off for norms and biases, 2 warm-up steps + cosine, clipping
//! at 1.0). Ten optimiser steps must give per-step losses within 1e-4 relative, the same
//! learning rates and gradient norms, the same set of trainable tensors, and final weights
//! that agree. The vision-LoRA case puts adapters on the vision blocks' linears too
//! (`train.vision = "lora"`, a `target_modules` regex over runtime names as PEFT applies it),
//! trained at the vision learning rate.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lmms_ft_core::config::{ComponentMode, Config, Mode, Scheduler, TargetModules};
use lmms_ft_core::family::Model;
use lmms_ft_core::peft::io::{load_adapter, read_safetensors};
use lmms_ft_core::testing::run_oracle;
use lmms_ft_core::train::{TrainOptions, Trainer};
use lmms_ft_qwen2_vl::model::Qwen2VlModel;
use tch::{Device, Kind};

const STEPS: u64 = 10;

/// PEFT's regexes of `scripts/oracle/train_qwen2_vl.py`, over transformers' runtime names.
const LLM_TARGETS: &str =
    r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)";
const VISION_TARGETS: &str = r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])";

fn config(mode: Mode, vision_lora: bool) -> Config {
    let mut c = Config::default();
    let t = &mut c.train;
    t.mode = mode;
    t.learning_rate = 1e-3;
    t.vision_lr = Some(2e-3);
    t.projector_lr = Some(5e-4);
    t.weight_decay = 0.1;
    t.warmup_ratio = 0.2; // ceil(0.2 · 10) = 2 warm-up steps
    t.scheduler = Scheduler::Cosine;
    t.max_grad_norm = 1.0;
    match mode {
        Mode::Full => t.vision = Some(ComponentMode::Full),
        _ => t.projector = Some(ComponentMode::Full),
    }
    c.lora.r = 4;
    c.lora.alpha = 8.0;
    c.lora.dropout = 0.0;
    if vision_lora {
        c.train.vision = Some(ComponentMode::Lora);
        c.lora.target_modules = TargetModules::Regex(format!("{LLM_TARGETS}|{VISION_TARGETS}"));
    }
    c
}

fn check(mode: Mode, accum: usize, vision_lora: bool) {
    let fx = common::fixture();
    let tag = match (mode, vision_lora) {
        (Mode::Full, _) => "full",
        (_, false) => "lora",
        (_, true) => "lora_vision",
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join(tag);
    let printed = run_oracle(
        "train_qwen2_vl.py",
        &[
            fx.dir.to_str().unwrap(),
            out.to_str().unwrap(),
            tag,
            &accum.to_string(),
            &STEPS.to_string(),
        ],
    );
    let oracle: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();

    let mut model = Qwen2VlModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap();
    if mode == Mode::Lora {
        load_adapter(
            &mut model,
            &out.join("init_adapter"),
            &Arc::new(AtomicBool::new(true)),
        )
        .unwrap();
    }
    let options = TrainOptions::from_config(&config(mode, vision_lora), STEPS).unwrap();
    let mut trainer = Trainer::new(&mut model, options).unwrap();
    if vision_lora {
        let vision_adapters = trainer
            .params
            .iter()
            .filter(|p| p.name.starts_with("visual.blocks.") && p.name.contains(".lora_"))
            .count();
        // 2 blocks × (qkv, proj, fc1, fc2) × (A, B).
        assert_eq!(vision_adapters, 16, "vision LoRA tensors");
    }
    assert_eq!(
        trainer.num_trainable(),
        oracle["trainable"].as_i64().unwrap(),
        "{tag}: trainable scalars"
    );

    for s in 0..STEPS as usize {
        let micro: Vec<usize> = (0..accum)
            .map(|j| (s * accum + j) % fx.batches.len())
            .collect();
        let stats = trainer
            .train_step(&micro, |&i| model.forward(&fx.batches[i], true))
            .unwrap();
        let (loss, lr, norm) = (
            oracle["loss"][s].as_f64().unwrap(),
            oracle["lr"][s].as_f64().unwrap(),
            oracle["grad_norm"][s].as_f64().unwrap(),
        );
        let rel = ((stats.loss - loss) / loss).abs();
        eprintln!(
            "{tag} accum {accum} step {}: loss {:.7} vs {loss:.7} (rel {rel:.1e}), grad norm {:.6} vs {norm:.6}",
            stats.step, stats.loss, stats.grad_norm
        );
        assert!(
            rel <= 1e-4,
            "{tag} accum {accum} step {}: loss {} vs {loss}",
            stats.step,
            stats.loss
        );
        assert!(
            (stats.lr - lr).abs() <= 1e-12,
            "{tag} step {}: lr {} vs {lr}",
            stats.step,
            stats.lr
        );
        assert!(
            ((stats.grad_norm - norm) / norm).abs() <= 1e-3,
            "{tag} step {}: grad norm {} vs {norm}",
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
        "{tag}: trainable tensors"
    );
    let worst = theirs
        .iter()
        .map(|(k, v)| (lmms_ft_core::testing::max_abs_diff(ours[k.as_str()], v), k))
        .fold(
            (0.0, None),
            |acc, (d, k)| if d > acc.0 { (d, Some(k)) } else { acc },
        );
    eprintln!(
        "{tag} accum {accum}: final weights max diff {:.2e} ({:?})",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= 1e-4,
        "{tag}: final weights differ by {} at {:?}",
        worst.0,
        worst.1
    );
}

#[test]
fn train_lora_matches_peft() {
    check(Mode::Lora, 1, false);
}

#[test]
fn train_lora_on_vision_tower_matches_peft() {
    check(Mode::Lora, 1, true);
}

#[test]
fn train_lora_grad_accum_2_matches_peft() {
    check(Mode::Lora, 2, false);
}

#[test]
fn train_full_matches_pytorch() {
    check(Mode::Full, 1, false);
}
