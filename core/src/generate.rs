//! Text generation shared by every family: a per-layer key/value cache, greedy or seeded
//! sampling, and stopping at the end-of-turn / end-of-sequence tokens the chat template
//! and `generation_config.json` name.

use anyhow::{bail, Result};
use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tch::{Kind, Tensor};

/// Keys and values of every decoder layer, `[B, kv_heads, T, D]`, grown one step at a time.
#[derive(Debug, Default)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

/// Where a generation stands after the prompt: the cache and the position the next token
/// takes (for M-RoPE families, the shared position of all three axes).
#[derive(Debug, Default)]
pub struct DecodeState {
    pub cache: KvCache,
    pub next_position: i64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub seed: u64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Generated {
    /// New tokens, without the stop token.
    pub token_ids: Vec<i64>,
    pub text: String,
    /// Whether a stop token ended the reply (rather than `max_new_tokens`).
    pub stopped: bool,
}

/// Picks next tokens from logits: argmax when greedy (first index on ties, as torch), else
/// temperature → top-k → top-p (nucleus) sampling from a seeded ChaCha stream.
pub struct TokenPicker {
    opts: GenerateOptions,
    rng: ChaCha8Rng,
}

impl TokenPicker {
    pub fn new(opts: GenerateOptions) -> Self {
        TokenPicker {
            opts,
            rng: ChaCha8Rng::seed_from_u64(opts.seed),
        }
    }

    /// `logits`: `[vocab]` for one position.
    pub fn pick(&mut self, logits: &Tensor) -> Result<i64> {
        let logits: Vec<f32> = Vec::try_from(
            logits
                .to_kind(Kind::Float)
                .to_device(tch::Device::Cpu)
                .flatten(0, -1),
        )?;
        if logits.is_empty() {
            bail!("empty logits");
        }
        if self.opts.temperature <= 0.0 {
            let mut best = 0;
            for (i, &v) in logits.iter().enumerate() {
                if v > logits[best] {
                    best = i;
                }
            }
            return Ok(best as i64);
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.opts.top_k > 0 {
            order.truncate(self.opts.top_k);
        }
        let t = self.opts.temperature as f32;
        let max = logits[order[0]] / t;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] / t - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let mut keep = probs.len();
        let mut acc = 0.0;
        for (n, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= self.opts.top_p {
                keep = n + 1;
                break;
            }
        }
        let kept: f64 = probs[..keep].iter().sum();
        let mut u = self.rng.random::<f64>() * kept;
        for (n, p) in probs[..keep].iter().enumerate() {
            u -= p;
            if u <= 0.0 {
                return Ok(order[n] as i64);
            }
        }
        Ok(order[keep - 1] as i64)
    }
}

/// End-of-sequence ids from a model directory's `generation_config.json` (a number or a list).
pub fn generation_config_eos(dir: &std::path::Path) -> Vec<i64> {
    let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) else {
        return Vec::new();
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    match &json["eos_token_id"] {
        serde_json::Value::Number(n) => n.as_i64().into_iter().collect(),
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_i64()).collect(),
        _ => Vec::new(),
    }
}
