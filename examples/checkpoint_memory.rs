//! Peak memory of one training step (forward + backward) of a Qwen2-VL-shaped model with
//! random weights on CPU, with and without gradient checkpointing.
//!
//! Each measurement runs in a fresh child process (this binary again, with `--child on|off`)
//! so the peak resident set (`VmHWM` in `/proc/self/status`) belongs to that step alone.
//!
//! ```text
//! cargo run --example checkpoint_memory [-- --layers 8 --hidden 512 --seq 1024]
//! ```

use std::process::Command;

use anyhow::{bail, Context, Result};
use lmms_ft_core::autograd::recomputations;
use lmms_ft_core::family::{HfConfig, Model, Trainable};
use lmms_ft_core::nn::ParamInit;
use lmms_ft_core::train::metrics::proc_kib;
use lmms_ft_qwen2_vl::config::Qwen2VlConfig;
use lmms_ft_qwen2_vl::model::Qwen2VlModel;
use lmms_ft_qwen2_vl::synthetic::image_batch;
use tch::{Device, Kind};

#[derive(Debug, Clone, Copy)]
struct Shape {
    layers: i64,
    hidden: i64,
    seq: i64,
    vocab: i64,
    vision_depth: i64,
    /// Image side in pixels (square); its tokens count towards `seq`.
    image: i64,
}

const IMAGE_TOKEN: i64 = 1001;

fn config(s: Shape) -> Result<Qwen2VlConfig> {
    let heads = s.hidden / 64;
    let json = serde_json::json!({
        "model_type": "qwen2_vl",
        "image_token_id": IMAGE_TOKEN,
        "video_token_id": 1002,
        "vision_start_token_id": 1003,
        "vision_end_token_id": 1004,
        "text_config": {
            "hidden_size": s.hidden,
            "intermediate_size": s.hidden * 3,
            "num_hidden_layers": s.layers,
            "num_attention_heads": heads,
            "num_key_value_heads": (heads / 4).max(1),
            "vocab_size": s.vocab,
            "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        },
        "vision_config": {
            "depth": s.vision_depth,
            "embed_dim": 256,
            "num_heads": 4,
            "mlp_ratio": 4,
            "hidden_size": s.hidden,
        },
    });
    Qwen2VlConfig::from_hf_json(&json)
}

/// `VmHWM` / `VmRSS` of this process in MiB.
fn status_mib(key: &str) -> Result<f64> {
    Ok(proc_kib("/proc/self/status", key)? as f64 / 1024.0)
}

fn child(s: Shape, checkpointing: bool) -> Result<()> {
    tch::manual_seed(0);
    let c = config(s)?;
    let mut model = Qwen2VlModel::new(&c, Device::Cpu, ParamInit::Normal { std: 0.02 });
    model.set_gradient_checkpointing(checkpointing);
    let batch = image_batch(&c, s.seq, s.image, Kind::Float)?;
    let rss_before = status_mib("VmRSS:")?;
    let start = std::time::Instant::now();
    let before = recomputations();
    let out = model.forward(&batch, true)?;
    let loss = out.mean_loss().context("batch has labels")?;
    loss.backward();
    let secs = start.elapsed().as_secs_f64();
    let params: i64 = Trainable::var_store(&model)
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    println!(
        "RESULT {}",
        serde_json::json!({
            "checkpointing": checkpointing,
            "params": params,
            "loss": loss.double_value(&[]),
            "rss_before_step_mib": rss_before,
            "peak_rss_mib": status_mib("VmHWM:")?,
            "recomputed_blocks": recomputations() - before,
            "step_seconds": secs,
        })
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut s = Shape {
        layers: 8,
        hidden: 512,
        seq: 1024,
        vocab: 32000,
        vision_depth: 8,
        image: 448,
    };
    let mut mode = None;
    let mut i = 1;
    while i < args.len() {
        let value = args
            .get(i + 1)
            .with_context(|| format!("{} needs a value", args[i]))?;
        match args[i].as_str() {
            "--child" => mode = Some(value == "on"),
            "--layers" => s.layers = value.parse()?,
            "--hidden" => s.hidden = value.parse()?,
            "--seq" => s.seq = value.parse()?,
            "--vocab" => s.vocab = value.parse()?,
            "--vision-depth" => s.vision_depth = value.parse()?,
            "--image" => s.image = value.parse()?,
            other => bail!("unknown argument {other}"),
        }
        i += 2;
    }
    if let Some(on) = mode {
        return child(s, on);
    }
    println!("{s:?}, threads {}", tch::get_num_threads());
    let exe = std::env::current_exe()?;
    let mut results = Vec::new();
    for on in ["off", "on"] {
        let out = Command::new(&exe)
            .args(args.iter().skip(1))
            .args(["--child", on])
            .output()
            .context("running the measuring child")?;
        if !out.status.success() {
            bail!("child failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .context("child printed no result")?;
        let r: serde_json::Value = serde_json::from_str(line)?;
        println!("{r}");
        results.push(r);
    }
    let peak = |r: &serde_json::Value| r["peak_rss_mib"].as_f64().unwrap_or(f64::NAN);
    let base = |r: &serde_json::Value| r["rss_before_step_mib"].as_f64().unwrap_or(f64::NAN);
    let (off, on) = (&results[0], &results[1]);
    println!(
        "peak RSS: {:.0} MiB without checkpointing, {:.0} MiB with; step memory above the \
         model: {:.0} MiB vs {:.0} MiB ({:.2}x less)",
        peak(off),
        peak(on),
        peak(off) - base(off),
        peak(on) - base(on),
        (peak(off) - base(off)) / (peak(on) - base(on)),
    );
    Ok(())
}
