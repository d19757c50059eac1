//! LoRA training throughput of lmms-ft, the other side of `scripts/bench/train_throughput.sh`:
//! the same checkpoint, samples and hyper-parameters as `scripts/bench/train_throughput.py run`
//! (LoRA r 8 / alpha 16 / dropout 0.05 on every LLM linear, AdamW lr 1e-4, cosine, clipping
//! at 1.0, batch 1, step s on sample s mod SAMPLES), timed per optimiser step through the
//! engine's `Trainer::train_step` (whose loss is the core's chunked loss head).
//!
//! Usage: `cargo run -p lmms-ft-qwen2-vl --example train_throughput -- DIR STEPS WARMUP THREADS`
//! (DIR made by `train_throughput.py make`). Prints one JSON line: step times after WARMUP
//! steps, losses, and this process's VmHWM.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use lmms_ft_core::config::{Config, Mode, Scheduler};
use lmms_ft_core::family::{HfConfig, Model};
use lmms_ft_core::loss::LossTargets;
use lmms_ft_core::train::metrics::peak_rss_bytes;
use lmms_ft_core::train::{TrainOptions, Trainer};
use lmms_ft_qwen2_vl::config::Qwen2VlConfig;
use lmms_ft_qwen2_vl::model::{Batch, Media, Qwen2VlModel};
use tch::{Device, Kind, Tensor};

/// User + system CPU time of this process from `/proc/self/stat` (in clock ticks of 1/100 s,
/// Linux's `USER_HZ`), as the Python side reads it: less disturbed than wall time on a
/// machine other jobs share.
fn cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    let rest = stat
        .rsplit_once(')')
        .context("unexpected /proc/self/stat")?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/self/stat")?
            .parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    ensure!(
        args.len() == 4,
        "usage: train_throughput DIR STEPS WARMUP THREADS"
    );
    let dir = PathBuf::from(&args[0]);
    let steps: u64 = args[1].parse().context("STEPS")?;
    let warmup: usize = args[2].parse().context("WARMUP")?;
    let threads: i32 = args[3].parse().context("THREADS")?;
    tch::set_num_threads(threads);

    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("config.json")).context("reading config.json")?,
    )?;
    let config = Qwen2VlConfig::from_hf_json(&json)?;
    let inputs: HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("inputs.safetensors"))?
        .into_iter()
        .collect();
    let described: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(dir.join("samples.json")).context("reading samples.json")?,
    )?;
    let mut batches = Vec::with_capacity(described.len());
    for i in 0..described.len() {
        let get = |k: &str| {
            inputs
                .get(&format!("{i}.{k}"))
                .with_context(|| format!("inputs.safetensors has no {i}.{k}"))
        };
        let grid: Vec<i64> = Vec::try_from(get("image_grid_thw")?.flatten(0, -1))?;
        batches.push(Batch {
            input_ids: get("input_ids")?.shallow_clone(),
            targets: Some(LossTargets::from_labels(get("labels")?)?),
            position_ids: get("position_ids")?.shallow_clone(),
            images: Some(Media {
                pixels: get("pixel_values")?.shallow_clone(),
                grids: grid.chunks(3).map(|c| [c[0], c[1], c[2]]).collect(),
            }),
            videos: None,
            attention_mask: None,
        });
    }
    ensure!(!batches.is_empty(), "samples.json lists no samples");

    let mut model = Qwen2VlModel::load(&config, &dir, Device::Cpu, Kind::Float)?;
    let mut c = Config::default();
    c.train.mode = Mode::Lora;
    c.train.learning_rate = 1e-4;
    c.train.weight_decay = 0.0;
    c.train.warmup_ratio = 0.0;
    c.train.scheduler = Scheduler::Cosine;
    c.train.max_grad_norm = 1.0;
    c.lora.r = 8;
    c.lora.alpha = 16.0;
    c.lora.dropout = 0.05;
    let mut trainer = Trainer::new(&mut model, TrainOptions::from_config(&c, steps)?)?;
    let loaded_peak = peak_rss_bytes();
    let (mut times, mut cpu, mut losses, mut tokens) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for s in 0..steps as usize {
        let batch = &batches[s % batches.len()];
        let (t0, c0) = (Instant::now(), cpu_seconds()?);
        // Read at once, as the Python side's `loss.item()` does every step.
        let stats = trainer.train_step(&[()], |_| model.forward(batch, true))?;
        times.push(t0.elapsed().as_secs_f64());
        cpu.push(cpu_seconds()? - c0);
        losses.push(stats.loss);
        tokens.push(batch.input_ids.size()[1]);
    }
    println!(
        "{}",
        serde_json::json!({
            "side": "lmms-ft",
            "threads": tch::get_num_threads(),
            "tokens": tokens.get(warmup..).unwrap_or_default(),
            "trainable": trainer.num_trainable(),
            "warmup": warmup,
            "step_s": times.get(warmup..).unwrap_or_default(),
            "cpu_s": cpu.get(warmup..).unwrap_or_default(),
            "loss": losses,
            "peak_rss_mib": peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
            "peak_rss_after_load_mib": loaded_peak.map(|b| b as f64 / (1024.0 * 1024.0)),
        })
    );
    Ok(())
}
