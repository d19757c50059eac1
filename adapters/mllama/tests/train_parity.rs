//! LoRA training parity with `transformers` + `peft` + a plain PyTorch AdamW loop
//! (`scripts/oracle/train_mllama.py`, the loop of `train_loop.py`) on the tiny
//! Llama-3.2-Vision checkpoint, through the shared
//! [`lmms_ft_core::testing::train_parity`] check: the oracle's random, non-zero initial
//! adapter loaded from its PEFT files (self-attention, cross-attention and MLP linears of the
//! LLM), the projector trained fully at its own learning rate, the four samples text, image,
//! 2×2 tiles and two images cycled in the same order. Ten optimiser steps must give per-step
//! losses within 1e-5 relative, the same learning rates and gradient norms, the same
//! trainable tensors, and final weights that agree.

mod common;

use lmms_ft_core::family::Model;
use lmms_ft_core::testing::train_parity::{TrainCase, TrainParity};
use lmms_ft_mllama::model::MllamaModel;
use tch::{Device, Kind};

const SAMPLES: [&str; 4] = ["text", "image", "tiles", "two_images"];

/// PEFT's regex of `scripts/oracle/train_mllama.py`, over transformers' runtime names.
const LLM_TARGETS: &str = r"model\.language_model\.layers\.\d+\.((self|cross)_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)";

fn check(accum: usize) {
    let fx = common::fixture();
    let batches: Vec<_> = SAMPLES.iter().map(|n| fx.batch(n, "labels")).collect();
    let parity = TrainParity {
        script: "train_mllama.py",
        fixture: &fx.dir,
        steps: 10,
        llm_targets: LLM_TARGETS,
        // The vision-LoRA case is not run for this family.
        vision_targets: "",
        vision_blocks: "vision_model.",
        vision_lora_tensors: 0,
    };
    let tmp = tempfile::tempdir().unwrap();
    parity.check_within(
        TrainCase::Lora,
        accum,
        batches.len(),
        tmp.path(),
        || MllamaModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap(),
        |model, i| model.forward(&batches[i], true),
        1e-5,
    );
}

#[test]
fn train_lora_matches_peft() {
    check(1);
}

#[test]
fn train_lora_grad_accum_2_matches_peft() {
    check(2);
}
