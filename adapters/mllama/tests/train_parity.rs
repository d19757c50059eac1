//! LoRA training parity with `transformers` + `peft` + a plain PyTorch AdamW loop
//! (`scripts/oracle/train_mllama.py`, the loop of `train_loop.py`) on the tiny
//! Llama-3.2-Vision checkpoint, through the shared
//! [`lmms_ft_core::testing::train_parity`] check: the oracle's random, non-zero initial
//! adapter loaded from its PEFT files (self-attention, cross-attention and MLP linears of the
//! LLM), the projector trained fully at its own learning rate, the four samples text, image,
//! 2×2 tiles and two images cycled in the same order. Ten optimiser steps must give per-step
//! losses within 1e-5 relative, the same learning rates and gradient norms, the same
//! trainable tensors, and final weights that agree; also with LoRA on the vision encoders.

mod common;

use lmms_ft_core::family::Model;
use lmms_ft_core::testing::train_parity::{TrainCase, TrainParity};
use lmms_ft_mllama::model::MllamaModel;
use tch::{Device, Kind};

const SAMPLES: [&str; 4] = ["text", "image", "tiles", "two_images"];

/// PEFT's regexes of `scripts/oracle/train_mllama.py`, over transformers' runtime names.
const VISION_TARGETS: &str = r"model\.vision_model\.(transformer|global_transformer)\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.fc[12])";
const LLM_TARGETS: &str = r"model\.language_model\.layers\.\d+\.((self|cross)_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)";

fn check(case: TrainCase, accum: usize) {
    let fx = common::fixture();
    let batches: Vec<_> = SAMPLES.iter().map(|n| fx.batch(n, "labels")).collect();
    let parity = TrainParity {
        script: "train_mllama.py",
        fixture: &fx.dir,
        steps: 10,
        llm_targets: LLM_TARGETS,
        vision_targets: VISION_TARGETS,
        vision_blocks: "vision_model.",
        // (3 local + 2 global layers) × (q, k, v, o, fc1, fc2) × (A, B).
        vision_lora_tensors: 60,
    };
    let tmp = tempfile::tempdir().unwrap();
    parity.check_within(
        case,
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
    check(TrainCase::Lora, 1);
}

/// `train.vision = "lora"`: adapters on the local and global vision encoders' linears too,
/// trained at the vision learning rate.
#[test]
fn train_lora_on_vision_model_matches_peft() {
    check(TrainCase::LoraVision, 1);
}
