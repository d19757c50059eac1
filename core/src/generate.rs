//! Text generation shared by every family: a per-layer key/value cache, greedy or seeded
//! sampling, and stopping at the end-of-turn / end-of-sequence tokens the chat template
//! and `generation_config.json` name.
//!
//! A family only implements [`crate::family::Model::prefill`] (its multimodal embeddings
//! through the decoder, filling the cache) and [`crate::family::Model::decode_step`] (one
//! token per row through the cache); [`decode_loop`] is the one generation loop, for one
//! prompt or a batch.
//!
//! # Batches
//!
//! Prompts are collated as for training, right-padded, so every family's collator and
//! position rule serve generation unchanged: under causal attention a row's real tokens
//! never see the padding after them, so its prefill equals that of the row alone. The padded
//! keys then sit between a short row's prompt and its generated tokens, and
//! [`DecodeState::valid`] masks them out of every later step; each row keeps its own next
//! position. This is left padding's effect without shifting any family's positions, and no
//! query row is ever fully masked (which gives NaN in attention).

use anyhow::{bail, ensure, Result};
use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::family::{ChatTemplate, Model};

/// Keys and values of every decoder layer, `[B, kv_heads, T, D]`, grown one step at a time.
#[derive(Debug, Default)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

/// Where a generation stands after the prompt: the cache, the position each row's next token
/// takes (for M-RoPE families, the shared position of all three axes), and which cached keys
/// each row may attend to.
#[derive(Debug, Default)]
pub struct DecodeState {
    pub cache: KvCache,
    /// Per row.
    pub next_positions: Vec<i64>,
    /// `[B, cached]` booleans, false at the padding after a shorter prompt; `None` when every
    /// cached key of every row is real (one prompt, or prompts of equal length).
    pub valid: Option<Tensor>,
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

    /// Whether picks are argmax (no randomness, so they can be taken on the device).
    pub fn is_greedy(&self) -> bool {
        self.opts.temperature <= 0.0
    }

    /// `logits`: `[vocab]` for one position.
    pub fn pick(&mut self, logits: &Tensor) -> Result<i64> {
        let logits: Vec<f32> = Vec::try_from(
            logits
                .to_kind(Kind::Float)
                .to_device(tch::Device::Cpu)
                .flatten(0, -1),
        )?;
        self.pick_from(&logits)
    }

    /// [`TokenPicker::pick`] on logits already on the host.
    pub fn pick_from(&mut self, logits: &[f32]) -> Result<i64> {
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

/// What [`decode_loop`] made of one row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowOutput {
    /// New tokens, without the stop token.
    pub token_ids: Vec<i64>,
    /// Whether a stop token ended the row (rather than `max_new_tokens`).
    pub stopped: bool,
}

/// The generation loop every family shares. `first`: the prefill's logits `[B, vocab]`;
/// `step` feeds one token per row and returns the next logits `[B, vocab]`. Each row gets
/// its own picker seeded with `opts.seed`, so a row samples the same tokens in a batch as
/// alone. A row that has stopped keeps being fed its stop token (its output is final) until
/// every row is done. `on_token(row, id)` sees every kept token as it is picked (streaming).
pub fn decode_loop(
    first: Tensor,
    step: &mut dyn FnMut(&[i64]) -> Result<Tensor>,
    stop_ids: &[i64],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, i64),
) -> Result<Vec<RowOutput>> {
    ensure!(
        first.dim() == 2,
        "prefill logits must be [batch, vocab], got {:?}",
        first.size()
    );
    let rows = first.size()[0] as usize;
    let mut pickers: Vec<TokenPicker> = (0..rows).map(|_| TokenPicker::new(*opts)).collect();
    let mut out = vec![RowOutput::default(); rows];
    let mut done = vec![opts.max_new_tokens == 0; rows];
    let mut logits = first;
    while done.iter().any(|d| !d) {
        let picks = pick_rows(&logits, &mut pickers)?;
        let mut feed = Vec::with_capacity(rows);
        for (row, &next) in picks.iter().enumerate() {
            let o = &mut out[row];
            if !done[row] {
                if stop_ids.contains(&next) {
                    o.stopped = true;
                    done[row] = true;
                } else {
                    o.token_ids.push(next);
                    on_token(row, next);
                    done[row] = o.token_ids.len() >= opts.max_new_tokens;
                }
            }
            feed.push(next);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        logits = step(&feed)?;
    }
    Ok(out)
}

/// One token per row: argmax on the device when greedy (torch's argmax takes the first
/// maximum, as [`TokenPicker`] does), one host copy of all rows' logits when sampling.
fn pick_rows(logits: &Tensor, pickers: &mut [TokenPicker]) -> Result<Vec<i64>> {
    if pickers.iter().all(TokenPicker::is_greedy) {
        return Ok(Vec::try_from(
            logits.argmax(-1, false).to_device(tch::Device::Cpu),
        )?);
    }
    let vocab = logits.size()[1] as usize;
    let flat: Vec<f32> = Vec::try_from(
        logits
            .to_kind(Kind::Float)
            .to_device(tch::Device::Cpu)
            .flatten(0, -1),
    )?;
    pickers
        .iter_mut()
        .zip(flat.chunks(vocab))
        .map(|(p, row)| p.pick_from(row))
        .collect()
}

/// Turns a growing list of generated ids into text pieces as they become printable: each
/// call decodes everything so far and returns what was added, holding back a tail that ends
/// in an incomplete character (byte-fallback tokens), so the pieces join to the final text.
pub struct TextStream {
    ids: Vec<i64>,
    printed: usize,
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}

impl TextStream {
    pub fn new() -> Self {
        TextStream {
            ids: Vec::new(),
            printed: 0,
        }
    }

    /// Adds `id`; returns the newly printable text (possibly empty).
    pub fn push(&mut self, id: i64, decode: &dyn Fn(&[i64]) -> Result<String>) -> Result<String> {
        self.ids.push(id);
        let text = decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.printed {
            return Ok(String::new());
        }
        let piece = text.get(self.printed..).unwrap_or_default().to_string();
        self.printed = text.len();
        Ok(piece)
    }
}

/// Generates from a batch of prompts (collated right-padded, row `i` holding `lengths[i]`
/// real tokens) through a model's [`Model::prefill`] and [`Model::decode_step`] and the one
/// [`decode_loop`], decoding text with `template`; `on_text(row, piece)` streams each row's
/// text as it is generated.
pub fn generate_batch<M: Model + ?Sized>(
    model: &M,
    batch: &M::Batch,
    lengths: &[usize],
    template: &dyn ChatTemplate,
    stop_ids: &[i64],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<Vec<Generated>> {
    let decode = |ids: &[i64]| template.decode(ids);
    let mut streams: Vec<TextStream> = lengths.iter().map(|_| TextStream::new()).collect();
    let mut stream_err = None;
    let rows = tch::no_grad(|| -> Result<_> {
        let (logits, mut state) = model.prefill(batch, lengths)?;
        decode_loop(
            logits,
            &mut |tokens| model.decode_step(&mut state, tokens),
            stop_ids,
            opts,
            &mut |row, id| match streams[row].push(id, &decode) {
                Ok(piece) if !piece.is_empty() => on_text(row, &piece),
                Ok(_) => {}
                Err(e) => stream_err = Some(e),
            },
        )
    })?;
    if let Some(e) = stream_err {
        return Err(e);
    }
    rows.into_iter()
        .map(|row| {
            Ok(Generated {
                text: template.decode(&row.token_ids)?,
                token_ids: row.token_ids,
                stopped: row.stopped,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[rows, 10]` logits whose argmax is `picks[row]`.
    fn logits(picks: &[i64]) -> Tensor {
        let t = Tensor::zeros([picks.len() as i64, 10], (Kind::Float, tch::Device::Cpu));
        for (row, &p) in picks.iter().enumerate() {
            let _ = t.get(row as i64).get(p).fill_(1.0);
        }
        t
    }

    /// Row 0 stops at its third pick (stop id 9), row 1 runs to `max_new_tokens`; the
    /// stopped row is fed its stop token while the other goes on, and streaming sees only
    /// kept tokens, in order.
    #[test]
    fn rows_stop_on_their_own() {
        let script = [[1, 4], [2, 5], [9, 6], [3, 7], [3, 8]];
        let mut fed = Vec::new();
        let mut calls = 0;
        let mut seen = Vec::new();
        let opts = GenerateOptions {
            max_new_tokens: 4,
            ..Default::default()
        };
        let out = decode_loop(
            logits(&script[0]),
            &mut |tokens| {
                fed.push(tokens.to_vec());
                calls += 1;
                Ok(logits(&script[calls]))
            },
            &[9],
            &opts,
            &mut |row, id| seen.push((row, id)),
        )
        .unwrap();
        assert_eq!(
            out,
            vec![
                RowOutput {
                    token_ids: vec![1, 2],
                    stopped: true
                },
                RowOutput {
                    token_ids: vec![4, 5, 6, 7],
                    stopped: false
                },
            ]
        );
        assert_eq!(fed, vec![vec![1, 4], vec![2, 5], vec![9, 6]]);
        assert_eq!(seen, vec![(0, 1), (1, 4), (0, 2), (1, 5), (1, 6), (1, 7)]);
        let none = decode_loop(
            logits(&[1]),
            &mut |_| bail!("no step for max_new_tokens = 0"),
            &[9],
            &GenerateOptions {
                max_new_tokens: 0,
                ..Default::default()
            },
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(none, vec![RowOutput::default()]);
    }

    /// Streamed pieces join to the full decode, holding back an incomplete character.
    #[test]
    fn text_stream_holds_back_incomplete_characters() {
        // Ids stand for bytes of "aé!" (é is two bytes).
        let bytes = "aé!".as_bytes().to_vec();
        let decode = |ids: &[i64]| -> Result<String> {
            let b: Vec<u8> = ids.iter().map(|&i| bytes[i as usize]).collect();
            Ok(String::from_utf8_lossy(&b).into_owned())
        };
        let mut s = TextStream::new();
        let pieces: Vec<String> = (0..4).map(|i| s.push(i, &decode).unwrap()).collect();
        assert_eq!(pieces, vec!["a", "", "é", "!"]);
    }
}
