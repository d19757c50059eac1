//! Ten training steps of Qwen3-VL on the tiny fixture checkpoint equal `transformers` +
//! `peft` + AdamW step by step (`scripts/oracle/train_qwen_vl.py`, the shared
//! [`TrainParity`] check): LoRA on the LLM's linears with the merger and DeepStack mergers
//! trained fully, the same with LoRA on the vision blocks too, and full fine-tuning (tied
//! embeddings trained once).

mod common;

use common::{fixture, SAMPLES};
use lmms_ft_core::family::Model;
use lmms_ft_core::testing::train_parity::{TrainCase, TrainParity};
use lmms_ft_qwen3_vl::model::{Batch, Qwen3VlModel};
use tch::{Device, Kind};

/// PEFT's regexes of `scripts/oracle/train_qwen_vl.py`, over transformers' runtime names.
const LLM_TARGETS: &str =
    r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)";
const VISION_TARGETS: &str = r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc[12])";

fn dense() -> Qwen3VlModel {
    let fx = fixture();
    Qwen3VlModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap()
}

fn batches() -> Vec<Batch> {
    SAMPLES.iter().map(|n| fixture().batch(n)).collect()
}

fn parity(case: TrainCase) {
    let fx = fixture();
    let batches = batches();
    let parity = TrainParity {
        script: "train_qwen_vl.py",
        fixture: &fx.dir,
        steps: 10,
        llm_targets: LLM_TARGETS,
        vision_targets: VISION_TARGETS,
        vision_blocks: "model.visual.blocks.",
        // 3 blocks × (qkv, proj, linear_fc1, linear_fc2) × (A, B).
        vision_lora_tensors: 24,
    };
    let tmp = tempfile::tempdir().unwrap();
    parity.check(case, 1, batches.len(), tmp.path(), dense, |model, i| {
        model.forward(&batches[i], true)
    });
}

#[test]
fn train_lora_matches_peft() {
    parity(TrainCase::Lora);
}

#[test]
fn train_lora_on_vision_tower_matches_peft() {
    parity(TrainCase::LoraVision);
}

#[test]
fn train_full_matches_pytorch() {
    parity(TrainCase::Full);
}
