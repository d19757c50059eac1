//! What the Qwen-VL vision transformers share: patches laid out merge block by merge block,
//! 2-D rotary positions (rows in the first half of each head's frequencies, columns in the
//! second), and self-attention confined to segments (one image or video frame, or a
//! Qwen2.5-VL window).

use lmms_ft_core::nn::{apply_rotary, rope_inv_freq, sdpa, Linear};
use tch::{Device, Kind, Tensor};

/// `(row, column)` of every patch of `grids`, in the processor's order (row-major over merge
/// blocks, then row-major inside each `m × m` block, repeated for each frame), and the
/// length in patches of each frame.
pub fn patch_positions(grids: &[[i64; 3]], m: i64) -> (Vec<[i64; 2]>, Vec<i64>) {
    let mut positions = Vec::new();
    let mut frames = Vec::new();
    for &[t, h, w] in grids {
        let mut frame = Vec::with_capacity((h * w) as usize);
        for bh in 0..h / m {
            for bw in 0..w / m {
                for ih in 0..m {
                    for iw in 0..m {
                        frame.push([bh * m + ih, bw * m + iw]);
                    }
                }
            }
        }
        for _ in 0..t {
            positions.extend_from_slice(&frame);
            frames.push(h * w);
        }
    }
    (positions, frames)
}

/// 2-D rotary tables `[patches, head_dim]` (fp32): half the frequencies for rows, half for
/// columns, repeated for both halves of the head as `rotate_half` expects.
pub fn rotary_tables(
    positions: &[[i64; 2]],
    head_dim: i64,
    theta: f64,
    device: Device,
) -> (Tensor, Tensor) {
    let inv = rope_inv_freq(head_dim / 2, theta, device);
    let flat: Vec<i64> = positions.iter().flat_map(|p| p.iter().copied()).collect();
    let pos = Tensor::from_slice(&flat)
        .view([-1, 2])
        .to_device(device)
        .to_kind(Kind::Float);
    let freqs = pos.unsqueeze(-1) * &inv; // [N, 2, D/4]
    let hw = freqs.view([positions.len() as i64, -1]); // rows then columns
    let emb = Tensor::cat(&[&hw, &hw], -1);
    (emb.cos(), emb.sin())
}

/// Multi-head self-attention of `x: [patches, width]` through the fused `qkv` and the output
/// `proj`, with 2-D rotary tables from [`rotary_tables`] (applied in fp32, as transformers
/// does), each of `segments` (lengths in patches, summing to all) attending only within
/// itself.
pub fn segment_attention(
    qkv: &Linear,
    proj: &Linear,
    x: &Tensor,
    heads: i64,
    cos: &Tensor,
    sin: &Tensor,
    segments: &[i64],
) -> Tensor {
    let (s, e) = x.size2().expect("[patches, width]");
    let hd = e / heads;
    let qkv = qkv.forward(x).view([s, 3, heads, hd]).permute([1, 0, 2, 3]);
    let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
    let (cs, sn) = (cos.unsqueeze(-2), sin.unsqueeze(-2));
    let q = apply_rotary(&q.to_kind(Kind::Float), &cs, &sn).to_kind(q.kind());
    let k = apply_rotary(&k.to_kind(Kind::Float), &cs, &sn).to_kind(k.kind());
    // [heads, S, hd]: each segment attends only within itself.
    let (q, k, v) = (q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1));
    let scale = (hd as f64).powf(-0.5);
    let one = |q: &Tensor, k: &Tensor, v: &Tensor| {
        sdpa(
            &q.unsqueeze(0),
            &k.unsqueeze(0),
            &v.unsqueeze(0),
            None,
            false,
            scale,
        )
        .squeeze_dim(0)
    };
    let attn = if segments.len() == 1 {
        one(&q, &k, &v)
    } else {
        let split = |t: &Tensor| t.split_with_sizes(segments, 1);
        let outs: Vec<Tensor> = split(&q)
            .iter()
            .zip(split(&k).iter())
            .zip(split(&v).iter())
            .map(|((q, k), v)| one(q, k, v))
            .collect();
        Tensor::cat(&outs, 1)
    };
    proj.forward(&attn.transpose(0, 1).reshape([s, e]))
}
