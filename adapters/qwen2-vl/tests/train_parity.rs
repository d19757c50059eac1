//! Training parity with `transformers` + `peft` + a plain PyTorch AdamW loop
//! (`scripts/oracle/train_qwen_vl.py`) on the tiny Qwen2-VL checkpoint, through the shared
//! [`lmms_ft_core::testing::train_parity`] check: same initial weights (the LoRA case loads
//! the oracle's random, non-zero initial adapter from its PEFT files), same four samples
//! cycled in the same order, same hyper-parameters. Ten optimiser steps must give per-step
//! losses within 1e-4 relative, the same learning rates and gradient norms, the same set of
//! trainable tensors, and final weights that agree. The vision-LoRA case puts adapters on the
//! vision blocks' linears too (`train.vision = "lora"`, a `target_modules` regex over runtime
//! names as PEFT applies it), trained at the vision learning rate.

mod common;

use lmms_ft_core::family::Model;
use lmms_ft_core::testing::train_parity::{TrainCase, TrainParity};
use lmms_ft_qwen2_vl::model::Qwen2VlModel;
use tch::{Device, Kind};

/// PEFT's regexes of `scripts/oracle/train_qwen_vl.py`, over transformers' runtime names.
const LLM_TARGETS: &str =
    r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)";
const VISION_TARGETS: &str = r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])";

fn check(case: TrainCase, accum: usize) {
    let fx = common::fixture();
    let parity = TrainParity {
        script: "train_qwen_vl.py",
        fixture: &fx.dir,
        steps: 10,
        llm_targets: LLM_TARGETS,
        vision_targets: VISION_TARGETS,
        vision_blocks: "visual.blocks.",
        // 2 blocks × (qkv, proj, fc1, fc2) × (A, B).
        vision_lora_tensors: 16,
    };
    let tmp = tempfile::tempdir().unwrap();
    parity.check(
        case,
        accum,
        fx.batches.len(),
        tmp.path(),
        || Qwen2VlModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap(),
        |model, i| model.forward(&fx.batches[i], true),
    );
}

#[test]
fn train_lora_matches_peft() {
    check(TrainCase::Lora, 1);
}

#[test]
fn train_lora_on_vision_tower_matches_peft() {
    check(TrainCase::LoraVision, 1);
}

#[test]
fn train_lora_grad_accum_2_matches_peft() {
    check(TrainCase::Lora, 2);
}

#[test]
fn train_full_matches_pytorch() {
    check(TrainCase::Full, 1);
}
