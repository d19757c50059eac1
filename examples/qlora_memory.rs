//! Peak memory and time of one training step of a real-sized Qwen2.5-VL (or Qwen2-VL) on CPU:
//! QLoRA (NF4 base with double quantisation, LoRA on every LLM linear) against LoRA on a
//! dense bf16 base. Batch 1, one image, about 256 tokens, gradient checkpointing on.
//!
//! Weights are random and created layer by layer straight into their storage (4-bit for the
//! quantised layers), so neither variant ever holds a second copy of the model, and the
//! QLoRA one never holds the dense LLM at all. Each variant runs in a fresh child process (this
//! binary again) so `VmHWM` (peak resident set) belongs to it alone.
//!
//! ```text
//! cargo run --example qlora_memory -- \
//!     --config tests/data/hub/Qwen--Qwen2.5-VL-7B-Instruct/config.json --mode both
//! ```
//! `--mode qlora|lora|both`; `both` runs the bf16 LoRA step only when `MemAvailable` is at
//! least `--min-free-gb` (default 19), since it needs about 17 GB.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use lmms_ft_core::config::{Config, Scheduler};
use lmms_ft_core::family::{HfConfig, Model, Trainable};
use lmms_ft_core::nn::ParamInit;
use lmms_ft_core::quant::{deferred, materialize_random, QuantSpec};
use lmms_ft_core::train::metrics::proc_kib;
use lmms_ft_core::train::{TrainOptions, Trainer};
use lmms_ft_qwen2_vl::config::Qwen2VlConfig;
use lmms_ft_qwen2_vl::model::Qwen2VlModel;
use lmms_ft_qwen2_vl::synthetic::image_batch;
use tch::{Device, Kind};

struct Args {
    config: PathBuf,
    mode: String,
    seq: i64,
    image: i64,
    checkpointing: bool,
    min_free_gb: f64,
}

/// A `/proc` status or meminfo field in GiB.
fn proc_gib(file: &str, key: &str) -> Result<f64> {
    Ok(proc_kib(file, key)? as f64 / (1024.0 * 1024.0))
}

fn child(a: &Args, qlora: bool) -> Result<()> {
    tch::manual_seed(0);
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let c = Qwen2VlConfig::from_hf_json(&serde_json::from_str(&text)?)?;
    let start = std::time::Instant::now();
    let (mut model, pending) = deferred(Kind::BFloat16, || {
        // Built in bf16 directly: no fp32 transient of the embeddings (2 GB at 7B).
        Ok(Qwen2VlModel::new_in(
            &c,
            Device::Cpu,
            ParamInit::Normal { std: 0.02 },
            Kind::BFloat16,
        ))
    })?;
    let spec = QuantSpec::from_config(&Config::default().quant)?;
    let done = materialize_random(&mut model, &pending, qlora.then_some(&spec), 0.02)?;
    let build_seconds = start.elapsed().as_secs_f64();
    let rss_model = proc_gib("/proc/self/status", "VmRSS:")?;
    model.set_gradient_checkpointing(a.checkpointing);

    let mut cfg = Config::default();
    cfg.train.scheduler = Scheduler::Constant;
    cfg.train.warmup_ratio = 0.0;
    let options = TrainOptions::from_config(&cfg, 1)?;
    let mut trainer = Trainer::new(&mut model, options)?;
    let batch = image_batch(&c, a.seq, a.image, Kind::BFloat16)?;
    let start = std::time::Instant::now();
    let stats = trainer.train_step(&[()], |_| model.forward(&batch, true))?;
    let step_seconds = start.elapsed().as_secs_f64();
    println!(
        "RESULT {}",
        serde_json::json!({
            "mode": if qlora { "qlora" } else { "lora" },
            "variant": format!("{:?}", c.variant),
            "tokens": batch.input_ids.size()[1],
            "quantized_linears": done.quantized,
            "dense_linears": done.dense,
            "quantized_gib": done.quantized_bytes as f64 / (1u64 << 30) as f64,
            "trainable_params": trainer.num_trainable(),
            "loss": stats.loss,
            "grad_norm": stats.grad_norm,
            "build_seconds": build_seconds,
            "rss_after_build_gib": rss_model,
            "step_seconds": step_seconds,
            "peak_rss_gib": proc_gib("/proc/self/status", "VmHWM:")?,
            "threads": tch::get_num_threads(),
        })
    );
    Ok(())
}

fn run_child(args: &[String], mode: &str) -> Result<serde_json::Value> {
    let out = Command::new(std::env::current_exe()?)
        .args(args.iter().skip(1))
        .args(["--child", mode])
        .output()
        .context("running the measuring child")?;
    if !out.status.success() {
        bail!(
            "{mode} child failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .context("child printed no result")?;
    Ok(serde_json::from_str(line)?)
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    let mut a = Args {
        config: PathBuf::new(),
        mode: "qlora".into(),
        seq: 256,
        image: 224,
        checkpointing: true,
        min_free_gb: 19.0,
    };
    let mut child_mode = None;
    let mut i = 1;
    while i < argv.len() {
        let value = argv
            .get(i + 1)
            .with_context(|| format!("{} needs a value", argv[i]))?;
        match argv[i].as_str() {
            "--config" => a.config = PathBuf::from(value),
            "--mode" => a.mode = value.clone(),
            "--seq" => a.seq = value.parse()?,
            "--image" => a.image = value.parse()?,
            "--checkpointing" => a.checkpointing = value == "on",
            "--min-free-gb" => a.min_free_gb = value.parse()?,
            "--child" => child_mode = Some(value.clone()),
            other => bail!("unknown argument {other}"),
        }
        i += 2;
    }
    if a.config.as_os_str().is_empty() {
        bail!("--config PATH/config.json is required");
    }
    if let Some(m) = child_mode {
        return child(&a, m == "qlora");
    }
    let modes: &[&str] = match a.mode.as_str() {
        "qlora" => &["qlora"],
        "lora" => &["lora"],
        "both" => &["qlora", "lora"],
        other => bail!("--mode must be qlora, lora or both, got {other}"),
    };
    let mut results = Vec::new();
    for &m in modes {
        if m == "lora" && a.mode == "both" {
            let free = proc_gib("/proc/meminfo", "MemAvailable:")?;
            if free < a.min_free_gb {
                println!(
                    "skipping the bf16 LoRA step: {free:.1} GiB available, {:.0} needed \
                     (run --mode lora when the machine is free)",
                    a.min_free_gb
                );
                continue;
            }
        }
        let r = run_child(&argv, m)?;
        println!("{r}");
        results.push(r);
    }
    if let [q, l] = results.as_slice() {
        let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "peak RSS: QLoRA {:.2} GiB vs bf16 LoRA {:.2} GiB ({:.2}x less); step {:.1} s vs {:.1} s",
            f(q, "peak_rss_gib"),
            f(l, "peak_rss_gib"),
            f(l, "peak_rss_gib") / f(q, "peak_rss_gib"),
            f(q, "step_seconds"),
            f(l, "step_seconds"),
        );
    }
    Ok(())
}
