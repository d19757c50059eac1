//! Multimodal rotary positions (M-RoPE). Every token gets three positions — time, row,
//! column. Text advances all three together; an image or video block gets its grid
//! coordinates offset from where it starts, and the text after it resumes at
//! `start + max(h, w) / merge`, exactly as `transformers`' `get_rope_index` (5.23) does.
//! Computed on the host from token ids and grids, in the collator, so the forward pass needs
//! no host sync. Qwen2-VL / Qwen2.5-VL give each axis a contiguous block of rotary
//! frequencies ([`mrope_cos_sin`]); Qwen3-VL interleaves them ([`mrope_cos_sin_interleaved`]).

use lmms_ft_core::nn::rope_inv_freq;
use tch::{Device, Kind, Tensor};

/// What the rope index needs from the config.
#[derive(Debug, Clone, Copy)]
pub struct RopeSpec {
    pub image_token_id: i64,
    pub video_token_id: i64,
    pub spatial_merge_size: i64,
    /// Qwen2.5-VL: video time positions advance by `tokens_per_second × seconds per grid`;
    /// `None` for Qwen2-VL (one position per temporal grid step).
    pub tokens_per_second: Option<f64>,
}

/// Positions `[3][len]` for one unpadded sequence. `image_grids` / `video_grids` are consumed
/// in order; `video_seconds[i]` is the duration of one temporal grid step of video `i`.
pub fn position_ids(
    ids: &[i64],
    spec: &RopeSpec,
    image_grids: &mut impl Iterator<Item = [i64; 3]>,
    video_grids: &mut impl Iterator<Item = ([i64; 3], f64)>,
) -> anyhow::Result<[Vec<i64>; 3]> {
    let mut out: [Vec<i64>; 3] = [
        Vec::with_capacity(ids.len()),
        Vec::with_capacity(ids.len()),
        Vec::with_capacity(ids.len()),
    ];
    let kind = |id: i64| {
        if id == spec.image_token_id {
            1
        } else if id == spec.video_token_id {
            2
        } else {
            0
        }
    };
    let m = spec.spatial_merge_size;
    let mut pos = 0i64;
    let mut i = 0;
    while i < ids.len() {
        let k = kind(ids[i]);
        let mut j = i;
        while j < ids.len() && kind(ids[j]) == k {
            j += 1;
        }
        if k == 0 {
            for n in 0..(j - i) as i64 {
                for axis in out.iter_mut() {
                    axis.push(pos + n);
                }
            }
            pos += (j - i) as i64;
        } else {
            let ([t, h, w], interval) = if k == 1 {
                let g = image_grids
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("more image token runs than image grids"))?;
                (g, 1.0)
            } else {
                let (g, seconds) = video_grids
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("more video token runs than video grids"))?;
                (g, spec.tokens_per_second.map_or(1.0, |tps| tps * seconds))
            };
            let (gh, gw) = (h / m, w / m);
            if (j - i) as i64 != t * gh * gw {
                anyhow::bail!(
                    "a media block has {} tokens but its grid {t}×{h}×{w} needs {}",
                    j - i,
                    t * gh * gw
                );
            }
            for ti in 0..t {
                // transformers: (arange(t) * interval).long(), truncating toward zero.
                let tp = (ti as f64 * interval) as i64 + pos;
                for hi in 0..gh {
                    for wi in 0..gw {
                        out[0].push(tp);
                        out[1].push(hi + pos);
                        out[2].push(wi + pos);
                    }
                }
            }
            pos += gh.max(gw);
        }
        i = j;
    }
    Ok(out)
}

/// `cos`, `sin` `[B, T, head_dim]` from positions `[3, B, T]`: the rotary half-dimension is
/// split into `sections` (time, rows, columns), each taking its frequencies from its own axis.
pub fn mrope_cos_sin(
    positions: &Tensor,
    sections: [i64; 3],
    head_dim: i64,
    theta: f64,
    kind: Kind,
    device: Device,
) -> (Tensor, Tensor) {
    let inv = rope_inv_freq(head_dim, theta, device);
    let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &inv; // [3, B, T, D/2]
    let mut parts = Vec::with_capacity(3);
    let mut start = 0;
    for (axis, &len) in sections.iter().enumerate() {
        parts.push(freqs.get(axis as i64).narrow(-1, start, len));
        start += len;
    }
    let half = Tensor::cat(&parts, -1);
    let emb = Tensor::cat(&[&half, &half], -1);
    (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
}

/// Qwen3-VL's interleaved M-RoPE (`mrope_interleaved`): frequency `i` of the half-dimension
/// takes its position from rows when `i % 3 == 1` and `i < 3 · sections[1]`, from columns
/// when `i % 3 == 2` and `i < 3 · sections[2]`, and from time otherwise, so every axis sees
/// low and high frequencies alike. Same shapes as [`mrope_cos_sin`].
pub fn mrope_cos_sin_interleaved(
    positions: &Tensor,
    sections: [i64; 3],
    head_dim: i64,
    theta: f64,
    kind: Kind,
    device: Device,
) -> (Tensor, Tensor) {
    let inv = rope_inv_freq(head_dim, theta, device);
    let half = head_dim / 2;
    let axis: Vec<i64> = (0..half)
        .map(|i| match i % 3 {
            1 if i < 3 * sections[1] => 1,
            2 if i < 3 * sections[2] => 2,
            _ => 0,
        })
        .collect();
    let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &inv; // [3, B, T, D/2]
    let s = freqs.size();
    let index = Tensor::from_slice(&axis)
        .to_device(device)
        .view([1, 1, 1, half])
        .expand([1, s[1], s[2], half], false);
    let mixed = freqs.gather(0, &index, false).squeeze_dim(0);
    let emb = Tensor::cat(&[&mixed, &mixed], -1);
    (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
}

/// A decode step's inputs: each row's next token `[B, 1]` and its M-RoPE position `[3, B, 1]`,
/// equal on all three axes because every generated token is text.
pub fn decode_inputs(tokens: &[i64], next_positions: &[i64], device: Device) -> (Tensor, Tensor) {
    let b = tokens.len() as i64;
    let ids = Tensor::from_slice(tokens).view([b, 1]).to_device(device);
    let positions = Tensor::from_slice(next_positions)
        .view([1, b, 1])
        .expand([3, b, 1], false)
        .to_device(device);
    (ids, positions)
}
