//! `MllamaTextModel`: the Llama-3.1 decoder (the shared [`DecoderLayer`]) with
//! cross-attention layers at `cross_attention_layers`, which attend from the text to the
//! projected vision states: q/k RMS-normed per head, the attention output and the MLP each
//! added through a `tanh` gate, and the MLP zeroed on text rows that see no image.
//!
//! As in `transformers`, a batch without images skips the cross-attention layers entirely;
//! with images, every row runs them (a row whose mask is all zeros attends to all vision
//! tokens, its MLP masked out, exactly as `_prepare_cross_attention_mask` arranges).
//!
//! Generation keeps each self-attention layer's keys / values in its [`KvCache`] slot, and
//! each cross-attention layer's vision keys / values, computed once at prefill, in its own
//! slot; two extra slots past the layers hold the cross-attention mask of each row's next
//! tokens (that of its last prompt token, as transformers repeats it) and which rows have
//! images.

use anyhow::{ensure, Result};
use lmms_ft_backbones::decoder::{rope_cos_sin, DecoderLayer, DecoderOptions, Mlp};
use lmms_ft_core::autograd::{checkpoint, grad_enabled, linear_tensors, ShallowClone};
use lmms_ft_core::generate::{DecodeState, KvCache};
use lmms_ft_core::nn::{repeat_kv, rope_inv_freq, sdpa, Embedding, Linear, ParamInit, RmsNorm};
use tch::nn::{Init, Path};
use tch::{Device, Kind, Tensor};

use crate::config::{Llama3Rope, TextConfig};

/// Inverse rotary frequencies with Llama-3.1's scaling, in transformers' fp32 op order.
pub fn llama3_inv_freq(dim: i64, base: f64, rope: Option<Llama3Rope>, device: Device) -> Tensor {
    let inv = rope_inv_freq(dim, base, device);
    let Some(r) = rope else { return inv };
    let low_wavelen = r.original_max_position_embeddings / r.low_freq_factor;
    let high_wavelen = r.original_max_position_embeddings / r.high_freq_factor;
    // Python's `2π / tensor` is `tensor.reciprocal() * 2π`.
    let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
    let scaled = &inv / r.factor;
    let llama = scaled.where_self(&wavelen.gt(low_wavelen), &inv);
    let smooth = (wavelen.reciprocal() * r.original_max_position_embeddings - r.low_freq_factor)
        / (r.high_freq_factor - r.low_freq_factor);
    let smoothed = (smooth.ones_like() - &smooth) * &llama / r.factor + &smooth * &llama;
    let medium = wavelen.lt(high_wavelen).logical_not() * wavelen.gt(low_wavelen).logical_not();
    smoothed.where_self(&medium, &llama)
}

/// The vision side of a batch as the cross-attention layers use it.
pub struct CrossContext {
    /// `[B, S, H]`: projected vision states, every image's tiles of a row flattened.
    pub states: Tensor,
    /// `[B, 1, T, S]` additive mask.
    pub mask: Tensor,
    /// `[B, T, 1]`: 0 on rows that attend to no image.
    pub full_row: Tensor,
    /// `[B, 1, 1]`: 0 for a sample without images. transformers runs such a sample through
    /// the cross-attention layers when it shares a batch with images (its rows attend to
    /// the padding image), unlike alone, where they are skipped; here it computes what it
    /// computes alone, so a sample's loss never depends on what it is batched with.
    pub has_images: Tensor,
}

pub struct CrossLayer {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    attn_gate: Tensor,
    mlp: Mlp,
    post_attention_layernorm: RmsNorm,
    mlp_gate: Tensor,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl ShallowClone for CrossLayer {
    fn shallow_clone(&self) -> Self {
        CrossLayer {
            input_layernorm: self.input_layernorm.shallow_clone(),
            q_proj: self.q_proj.shallow_clone(),
            k_proj: self.k_proj.shallow_clone(),
            v_proj: self.v_proj.shallow_clone(),
            o_proj: self.o_proj.shallow_clone(),
            q_norm: self.q_norm.shallow_clone(),
            k_norm: self.k_norm.shallow_clone(),
            attn_gate: self.attn_gate.shallow_clone(),
            mlp: self.mlp.shallow_clone(),
            post_attention_layernorm: self.post_attention_layernorm.shallow_clone(),
            mlp_gate: self.mlp_gate.shallow_clone(),
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }
}

impl CrossLayer {
    fn new(p: &Path, c: &TextConfig, init: ParamInit) -> Self {
        let d = &c.decoder;
        let (h, hd) = (d.hidden_size, d.head_dim);
        let a = p / "cross_attn";
        let eps = d.rms_norm_eps;
        CrossLayer {
            input_layernorm: RmsNorm::new(&(p / "input_layernorm"), h, eps),
            q_proj: Linear::new(&(&a / "q_proj"), h, d.num_heads * hd, false, init),
            k_proj: Linear::new(&(&a / "k_proj"), h, d.num_kv_heads * hd, false, init),
            v_proj: Linear::new(&(&a / "v_proj"), h, d.num_kv_heads * hd, false, init),
            o_proj: Linear::new(&(&a / "o_proj"), d.num_heads * hd, h, false, init),
            q_norm: RmsNorm::new(&(&a / "q_norm"), hd, eps),
            k_norm: RmsNorm::new(&(&a / "k_norm"), hd, eps),
            attn_gate: p.var("cross_attn_attn_gate", &[1], Init::Const(0.0)),
            mlp: Mlp::new(&(p / "mlp"), d, init),
            post_attention_layernorm: RmsNorm::new(&(p / "post_attention_layernorm"), h, eps),
            mlp_gate: p.var("cross_attn_mlp_gate", &[1], Init::Const(0.0)),
            heads: d.num_heads,
            kv_heads: d.num_kv_heads,
            head_dim: hd,
        }
    }

    fn has_trainable(&self) -> bool {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
            .into_iter()
            .chain(self.mlp.linears())
            .flat_map(linear_tensors)
            .chain([
                &self.input_layernorm.weight,
                &self.post_attention_layernorm.weight,
                &self.q_norm.weight,
                &self.k_norm.weight,
                &self.attn_gate,
                &self.mlp_gate,
            ])
            .any(|t| t.requires_grad())
    }

    /// Keys (normed) and values of the vision states, `[B, kv_heads, S, head_dim]` each.
    pub fn vision_kv(&self, states: &Tensor) -> (Tensor, Tensor) {
        let b = states.size()[0];
        let split = |y: Tensor| {
            y.view([b, -1, self.kv_heads, self.head_dim])
                .transpose(1, 2)
        };
        let k = self.k_norm.forward(&split(self.k_proj.forward(states)));
        let v = split(self.v_proj.forward(states));
        (k, v)
    }

    fn forward(
        &self,
        x: &Tensor,
        kv: &(Tensor, Tensor),
        mask: &Tensor,
        full_row: &Tensor,
        has_images: &Tensor,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("[B, T, H]");
        let y = self.input_layernorm.forward(x);
        let q = self
            .q_proj
            .forward(&y)
            .view([b, t, self.heads, self.head_dim])
            .transpose(1, 2);
        let q = self.q_norm.forward(&q);
        let n_rep = self.heads / self.kv_heads;
        let (k, v) = (repeat_kv(&kv.0, n_rep), repeat_kv(&kv.1, n_rep));
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = sdpa(&q, &k, &v, Some(mask), false, scale);
        let out =
            self.o_proj.forward(
                &out.transpose(1, 2)
                    .reshape([b, t, self.heads * self.head_dim]),
            );
        let h = x + self.attn_gate.tanh() * out * has_images;
        let m = self.mlp.forward(&self.post_attention_layernorm.forward(&h)) * full_row;
        &h + self.mlp_gate.tanh() * m
    }
}

pub enum TextLayer {
    SelfAttention(DecoderLayer),
    CrossAttention(CrossLayer),
}

/// `language_model.model.*` plus `language_model.lm_head`.
pub struct TextModel {
    pub config: TextConfig,
    pub embed_tokens: Embedding,
    pub layers: Vec<TextLayer>,
    pub norm: RmsNorm,
    lm_head: Option<Linear>,
    inv_freq: Tensor,
    gradient_checkpointing: bool,
}

impl TextModel {
    pub fn new(model: &Path, lm_head: &Path, c: &TextConfig, init: ParamInit) -> Self {
        let d = &c.decoder;
        let layers = (0..d.num_layers)
            .map(|i| {
                let p = model / "layers" / i;
                if c.is_cross(i) {
                    TextLayer::CrossAttention(CrossLayer::new(&p, c, init))
                } else {
                    TextLayer::SelfAttention(DecoderLayer::new(
                        &p,
                        d,
                        &DecoderOptions::default(),
                        init,
                    ))
                }
            })
            .collect();
        TextModel {
            embed_tokens: Embedding::new(
                &(model / "embed_tokens"),
                c.embedding_rows(),
                d.hidden_size,
                init,
            ),
            layers,
            norm: RmsNorm::new(&(model / "norm"), d.hidden_size, d.rms_norm_eps),
            lm_head: (!d.tie_word_embeddings)
                .then(|| Linear::new(lm_head, d.hidden_size, d.vocab_size, false, init)),
            inv_freq: llama3_inv_freq(d.head_dim, d.rope_theta, c.rope_scaling, model.device()),
            config: c.clone(),
            gradient_checkpointing: false,
        }
    }

    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    pub fn embed(&self, ids: &Tensor) -> Tensor {
        self.embed_tokens.forward(ids)
    }

    /// Rotary tables for `positions: [B, T]`.
    pub fn rotary(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        rope_cos_sin(
            positions,
            &self.inv_freq.to_device(positions.device()),
            kind,
        )
    }

    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            // Tied: the first `vocab_size` embedding rows.
            None => hidden.linear::<Tensor>(
                &self
                    .embed_tokens
                    .weight
                    .narrow(0, 0, self.config.decoder.vocab_size),
                None,
            ),
        }
    }

    /// Layers and final norm over `[B, T, H]` embeddings.
    pub fn hidden_states(
        &self,
        embeds: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cross: Option<&CrossContext>,
    ) -> Tensor {
        let checkpointing = self.gradient_checkpointing && grad_enabled();
        let mut h = embeds.shallow_clone();
        for layer in &self.layers {
            h = match layer {
                TextLayer::SelfAttention(l) => {
                    if checkpointing && (h.requires_grad() || l.has_trainable()) {
                        let l = l.shallow_clone();
                        let (cos, sin) = (cos.shallow_clone(), sin.shallow_clone());
                        checkpoint(&[&h], move |xs| l.forward(&xs[0], &cos, &sin, None, None))
                    } else {
                        l.forward(&h, cos, sin, None, None)
                    }
                }
                TextLayer::CrossAttention(l) => {
                    let Some(cx) = cross else { continue };
                    if checkpointing
                        && (h.requires_grad() || cx.states.requires_grad() || l.has_trainable())
                    {
                        let l = l.shallow_clone();
                        let (mask, row) = (cx.mask.shallow_clone(), cx.full_row.shallow_clone());
                        let has = cx.has_images.shallow_clone();
                        checkpoint(&[&h, &cx.states], move |xs| {
                            l.forward(&xs[0], &l.vision_kv(&xs[1]), &mask, &row, &has)
                        })
                    } else {
                        l.forward(
                            &h,
                            &l.vision_kv(&cx.states),
                            &cx.mask,
                            &cx.full_row,
                            &cx.has_images,
                        )
                    }
                }
            };
        }
        self.norm.forward(&h)
    }

    /// The cached forward of generation: self-attention keys / values go to their slots,
    /// cross-attention layers read theirs (filled at prefill).
    fn hidden_states_cached(
        &self,
        embeds: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        self_mask: Option<&Tensor>,
        cross_mask: Option<(&Tensor, &Tensor, &Tensor)>,
        cache: &mut KvCache,
    ) -> Tensor {
        let mut h = embeds.shallow_clone();
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = match layer {
                TextLayer::SelfAttention(l) => l.forward(&h, cos, sin, self_mask, Some(slot)),
                TextLayer::CrossAttention(l) => match (slot.as_ref(), cross_mask) {
                    (Some(kv), Some((mask, row, has))) => l.forward(&h, kv, mask, row, has),
                    _ => continue,
                },
            };
        }
        self.norm.forward(&h)
    }

    /// Generation prefill of right-padded prompt embeddings `[B, T, H]` (row `i` holding
    /// `lengths[i]` real tokens, positions `0..T`): returns each row's last-token logits.
    pub fn prefill(
        &self,
        embeds: &Tensor,
        lengths: &[usize],
        cross: Option<&CrossContext>,
    ) -> Result<(Tensor, DecodeState)> {
        let (b, t, h) = embeds.size3()?;
        ensure!(
            lengths.len() == b as usize,
            "{} prompt lengths for a batch of {b}",
            lengths.len()
        );
        ensure!(
            lengths.iter().all(|&l| l >= 1 && l as i64 <= t),
            "prompt lengths {lengths:?} do not fit a batch of {t} positions"
        );
        let device = embeds.device();
        let positions = Tensor::arange(t, (Kind::Int64, device))
            .unsqueeze(0)
            .expand([b, t], false);
        let (cos, sin) = self.rotary(&positions, embeds.kind());
        let n = self.layers.len();
        let mut state = DecodeState {
            next_positions: lengths.iter().map(|&l| l as i64).collect(),
            ..DecodeState::default()
        };
        state.cache.layers.resize_with(n + 2, || None);
        let lens: Vec<i64> = lengths.iter().map(|&l| l as i64).collect();
        let lens = Tensor::from_slice(&lens).to_device(device);
        if let Some(cx) = cross {
            for (layer, slot) in self.layers.iter().zip(state.cache.layers.iter_mut()) {
                if let TextLayer::CrossAttention(l) = layer {
                    *slot = Some(l.vision_kv(&cx.states));
                }
            }
            // Each row's next tokens see what its last prompt token sees.
            let s = cx.mask.size()[3];
            let idx = (&lens - 1).view([b, 1, 1, 1]);
            let mask = cx.mask.gather(2, &idx.expand([b, 1, 1, s], false), false);
            let row = cx.full_row.gather(1, &(&lens - 1).view([b, 1, 1]), false);
            state.cache.layers[n] = Some((mask, row));
            let has = cx.has_images.shallow_clone();
            state.cache.layers[n + 1] = Some((has.shallow_clone(), has));
        }
        let cross_mask = cross.map(|cx| (&cx.mask, &cx.full_row, &cx.has_images));
        let hidden =
            self.hidden_states_cached(embeds, &cos, &sin, None, cross_mask, &mut state.cache);
        let last = hidden
            .gather(
                1,
                &(&lens - 1).view([b, 1, 1]).expand([b, 1, h], false),
                false,
            )
            .squeeze_dim(1);
        if lengths.iter().any(|&l| (l as i64) < t) {
            let keys = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0);
            state.valid = Some(keys.lt_tensor(&lens.unsqueeze(1)));
        }
        Ok((self.logits(&last), state))
    }

    /// One token per row at each row's next position; returns the next logits `[B, vocab]`.
    pub fn decode_step(&self, state: &mut DecodeState, ids: &Tensor) -> Tensor {
        let b = ids.size()[0];
        let device = ids.device();
        let embeds = self.embed(ids);
        let positions = Tensor::from_slice(&state.next_positions)
            .view([b, 1])
            .to_device(device);
        let (cos, sin) = self.rotary(&positions, embeds.kind());
        let self_mask = state.valid.take().map(|valid| {
            let grown = Tensor::cat(&[&valid, &Tensor::ones([b, 1], (Kind::Bool, device))], 1);
            let mask = grown.view([b, 1, 1, -1]);
            state.valid = Some(grown);
            mask
        });
        let n = self.layers.len();
        let slot = |i: usize| state.cache.layers.get(i).and_then(|s| s.as_ref());
        let cross = match (slot(n), slot(n + 1)) {
            (Some((m, r)), Some((has, _))) => {
                Some((m.shallow_clone(), r.shallow_clone(), has.shallow_clone()))
            }
            _ => None,
        };
        let hidden = self.hidden_states_cached(
            &embeds,
            &cos,
            &sin,
            self_mask.as_ref(),
            cross.as_ref().map(|(m, r, h)| (m, r, h)),
            &mut state.cache,
        );
        state.next_positions.iter_mut().for_each(|p| *p += 1);
        self.logits(&hidden.squeeze_dim(1))
    }

    /// Hub names under `model` (`language_model.model`) and `lm_head`.
    pub fn visit_linears(
        &mut self,
        model: &str,
        lm_head: &str,
        f: &mut dyn FnMut(&str, &mut Linear),
    ) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("{model}.layers.{i}");
            match layer {
                TextLayer::SelfAttention(l) => l.visit_linears(&p, f),
                TextLayer::CrossAttention(l) => {
                    f(&format!("{p}.cross_attn.q_proj"), &mut l.q_proj);
                    f(&format!("{p}.cross_attn.k_proj"), &mut l.k_proj);
                    f(&format!("{p}.cross_attn.v_proj"), &mut l.v_proj);
                    f(&format!("{p}.cross_attn.o_proj"), &mut l.o_proj);
                    l.mlp.visit_linears(&format!("{p}.mlp"), f);
                }
            }
        }
        if let Some(head) = &mut self.lm_head {
            f(lm_head, head);
        }
    }
}
