//! The Llama-style pre-norm decoder: RMSNorm → attention with rotary positions and grouped
//! KV heads → residual → RMSNorm → SwiGLU MLP → residual. Parameter names follow the Hub
//! (`layers.N.self_attn.q_proj.weight`, ...), relative to the path the caller passes.
//! [`DecoderOptions`] adds what later decoders change (Qwen3's per-head q/k RMSNorm, Phi-3's
//! fused projections), and the `*_hooked` runs let a family add to a layer's output
//! (Qwen3-VL's DeepStack).

use anyhow::{ensure, Result};
use lmms_ft_core::autograd::{checkpoint, grad_enabled, linear_tensors, ShallowClone};
use lmms_ft_core::generate::{DecodeState, KvCache};
use lmms_ft_core::nn::{
    apply_rotary, linear_params, repeat_kv, sdpa, Embedding, Linear, ParamInit, RmsNorm,
};
use tch::nn::Path;
use tch::{Kind, Tensor};

/// Sizes and switches of a decoder; families fill it from their `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Bias on q/k/v projections (Qwen2: yes; Llama: `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`; never for Qwen2).
    pub o_bias: bool,
    pub tie_word_embeddings: bool,
}

impl DecoderConfig {
    /// Parameters of embeddings + layers + final norm + (untied) lm_head.
    pub fn num_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = (self.num_heads * self.head_dim) as u64;
        let kv = (self.num_kv_heads * self.head_dim) as u64;
        let i = self.intermediate_size as u64;
        let v = self.vocab_size as u64;
        let attn = linear_params(h, q, self.qkv_bias)
            + 2 * linear_params(h, kv, self.qkv_bias)
            + linear_params(q, h, self.o_bias);
        let mlp = 3 * linear_params(h, i, false);
        let layer = attn + mlp + 2 * h;
        let lm_head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers as u64 * layer + h + lm_head
    }
}

/// Switches beyond the sizes, off by default (the Llama / Qwen2 decoder).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecoderOptions {
    /// Qwen3: RMSNorm over each head of q and k (`self_attn.q_norm` / `k_norm`, width
    /// `head_dim`) before the rotary embedding.
    pub qk_norm: bool,
    /// How the checkpoint stores the attention and MLP input projections.
    pub projections: ProjectionLayout,
}

/// How a checkpoint stores the attention input and MLP input projections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProjectionLayout {
    /// `q_proj` / `k_proj` / `v_proj` and `gate_proj` / `up_proj` (Llama, Mistral, Qwen2).
    #[default]
    Split,
    /// One `qkv_proj` (rows: q, then k, then v) and one `gate_up_proj` (rows: gate, then up),
    /// as Phi-3 stores them; LoRA then adapts the fused modules, as `peft` does on them.
    Fused,
}

/// The q/k/v projections, separate or fused. One per layer, built once and never moved in a
/// hot path, so the variants' size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

impl Qkv {
    fn linears(&self) -> Vec<&Linear> {
        match self {
            Qkv::Split { q, k, v } => vec![q, k, v],
            Qkv::Fused(qkv) => vec![qkv],
        }
    }
}

impl DecoderOptions {
    /// Parameters these options add to [`DecoderConfig::num_parameters`].
    pub fn extra_parameters(&self, c: &DecoderConfig) -> u64 {
        if self.qk_norm {
            (2 * c.head_dim * c.num_layers) as u64
        } else {
            0
        }
    }
}

/// What a family adds to each layer's output: called with the layer index and its output,
/// returns the hidden states the next layer gets.
pub type LayerHook<'a> = &'a dyn Fn(usize, Tensor) -> Tensor;

pub struct Attention {
    qkv: Qkv,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl ShallowClone for Attention {
    fn shallow_clone(&self) -> Self {
        Attention {
            qkv: match &self.qkv {
                Qkv::Split { q, k, v } => Qkv::Split {
                    q: q.shallow_clone(),
                    k: k.shallow_clone(),
                    v: v.shallow_clone(),
                },
                Qkv::Fused(qkv) => Qkv::Fused(qkv.shallow_clone()),
            },
            o_proj: self.o_proj.shallow_clone(),
            q_norm: self.q_norm.as_ref().map(RmsNorm::shallow_clone),
            k_norm: self.k_norm.as_ref().map(RmsNorm::shallow_clone),
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }
}

impl Attention {
    fn new(p: &Path, c: &DecoderConfig, opts: &DecoderOptions, init: ParamInit) -> Self {
        let q = c.num_heads * c.head_dim;
        let kv = c.num_kv_heads * c.head_dim;
        let norm = |name: &str| {
            opts.qk_norm
                .then(|| RmsNorm::new(&(p / name), c.head_dim, c.rms_norm_eps))
        };
        let h = c.hidden_size;
        let qkv = match opts.projections {
            ProjectionLayout::Split => Qkv::Split {
                q: Linear::new(&(p / "q_proj"), h, q, c.qkv_bias, init),
                k: Linear::new(&(p / "k_proj"), h, kv, c.qkv_bias, init),
                v: Linear::new(&(p / "v_proj"), h, kv, c.qkv_bias, init),
            },
            ProjectionLayout::Fused => Qkv::Fused(Linear::new(
                &(p / "qkv_proj"),
                h,
                q + 2 * kv,
                c.qkv_bias,
                init,
            )),
        };
        Attention {
            q_norm: norm("q_norm"),
            k_norm: norm("k_norm"),
            qkv,
            o_proj: Linear::new(&(p / "o_proj"), q, c.hidden_size, c.o_bias, init),
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        }
    }

    /// `x: [B, T, H]`, `cos`/`sin`: `[B, T, D]`. Causal; a right-padded batch needs no mask
    /// because real tokens never attend to the padding after them. With `cache`, keys and
    /// values of earlier positions are prepended and the new ones appended to it.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("[B, T, H]");
        let split = |y: Tensor, n: i64, norm: Option<&RmsNorm>| {
            let y = y.reshape([b, t, n, self.head_dim]);
            match norm {
                Some(norm) => norm.forward(&y),
                None => y,
            }
            .transpose(1, 2)
        };
        let (q, k, v) = match &self.qkv {
            Qkv::Split { q, k, v } => (q.forward(x), k.forward(x), v.forward(x)),
            Qkv::Fused(qkv) => {
                let y = qkv.forward(x);
                let (nq, nkv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
                (
                    y.narrow(-1, 0, nq),
                    y.narrow(-1, nq, nkv),
                    y.narrow(-1, nq + nkv, nkv),
                )
            }
        };
        let q = split(q, self.heads, self.q_norm.as_ref());
        let k = split(k, self.kv_heads, self.k_norm.as_ref());
        let v = split(v, self.kv_heads, None);
        let (cos, sin) = (cos.unsqueeze(1), sin.unsqueeze(1));
        let q = apply_rotary(&q, &cos, &sin);
        let mut k = apply_rotary(&k, &cos, &sin);
        let mut v = v;
        let mut past_len = 0;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                past_len = pk.size()[2];
                k = Tensor::cat(&[pk, &k], 2);
                v = Tensor::cat(&[pv, &v], 2);
            }
            *slot = Some((k.shallow_clone(), v.shallow_clone()));
        }
        let n_rep = self.heads / self.kv_heads;
        let (k, v) = (repeat_kv(&k, n_rep), repeat_kv(&v, n_rep));
        let scale = (self.head_dim as f64).powf(-0.5);
        // One new token attends to everything cached; several new tokens after a cache need
        // a causal mask offset by the cached length.
        let offset_mask;
        let (mask, causal) = match (mask, past_len, t) {
            (Some(m), _, _) => (Some(m), true),
            (None, 0, _) => (None, true),
            (None, _, 1) => (None, false),
            (None, past, _) => {
                offset_mask = Tensor::ones([t, past + t], (tch::Kind::Bool, x.device())).tril(past);
                (Some(&offset_mask), false)
            }
        };
        let out = sdpa(&q, &k, &v, mask, causal, scale);
        self.o_proj.forward(
            &out.transpose(1, 2)
                .reshape([b, t, self.heads * self.head_dim]),
        )
    }
}

/// The gate and up projections, separate or fused.
enum GateUp {
    Split { gate: Linear, up: Linear },
    Fused(Linear),
}

pub struct Mlp {
    gate_up: GateUp,
    down_proj: Linear,
}

impl ShallowClone for Mlp {
    fn shallow_clone(&self) -> Self {
        Mlp {
            gate_up: match &self.gate_up {
                GateUp::Split { gate, up } => GateUp::Split {
                    gate: gate.shallow_clone(),
                    up: up.shallow_clone(),
                },
                GateUp::Fused(gu) => GateUp::Fused(gu.shallow_clone()),
            },
            down_proj: self.down_proj.shallow_clone(),
        }
    }
}

impl Mlp {
    /// The SwiGLU MLP under `p` (`gate_proj` / `up_proj` / `down_proj`), also used by
    /// families whose layers wrap it differently (Mllama's cross-attention layers).
    pub fn new(p: &Path, c: &DecoderConfig, init: ParamInit) -> Self {
        Mlp::with_options(p, c, &DecoderOptions::default(), init)
    }

    /// [`Mlp::new`] with the projections stored as `opts.projections` says.
    pub fn with_options(
        p: &Path,
        c: &DecoderConfig,
        opts: &DecoderOptions,
        init: ParamInit,
    ) -> Self {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let gate_up = match opts.projections {
            ProjectionLayout::Split => GateUp::Split {
                gate: Linear::new(&(p / "gate_proj"), h, i, false, init),
                up: Linear::new(&(p / "up_proj"), h, i, false, init),
            },
            ProjectionLayout::Fused => {
                GateUp::Fused(Linear::new(&(p / "gate_up_proj"), h, 2 * i, false, init))
            }
        };
        Mlp {
            gate_up,
            down_proj: Linear::new(&(p / "down_proj"), i, h, false, init),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (gate, up) = match &self.gate_up {
            GateUp::Split { gate, up } => (gate.forward(x), up.forward(x)),
            GateUp::Fused(gu) => {
                let y = gu.forward(x);
                let i = y.size().last().copied().unwrap_or(0) / 2;
                (y.narrow(-1, 0, i), y.narrow(-1, i, i))
            }
        };
        self.down_proj.forward(&(gate.silu() * up))
    }

    pub fn linears(&self) -> Vec<&Linear> {
        let mut all = match &self.gate_up {
            GateUp::Split { gate, up } => vec![gate, up],
            GateUp::Fused(gu) => vec![gu],
        };
        all.push(&self.down_proj);
        all
    }

    /// Visits `{prefix}.gate_proj` / `{prefix}.up_proj` (or `{prefix}.gate_up_proj`) and
    /// `{prefix}.down_proj`.
    pub fn visit_linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        match &mut self.gate_up {
            GateUp::Split { gate, up } => {
                f(&format!("{prefix}.gate_proj"), gate);
                f(&format!("{prefix}.up_proj"), up);
            }
            GateUp::Fused(gu) => f(&format!("{prefix}.gate_up_proj"), gu),
        }
        f(&format!("{prefix}.down_proj"), &mut self.down_proj);
    }
}

pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl ShallowClone for DecoderLayer {
    fn shallow_clone(&self) -> Self {
        DecoderLayer {
            input_layernorm: self.input_layernorm.shallow_clone(),
            self_attn: self.self_attn.shallow_clone(),
            post_attention_layernorm: self.post_attention_layernorm.shallow_clone(),
            mlp: self.mlp.shallow_clone(),
        }
    }
}

impl DecoderLayer {
    /// Whether any parameter of the layer (LoRA factors included) trains.
    pub fn has_trainable(&self) -> bool {
        let a = &self.self_attn;
        a.qkv
            .linears()
            .into_iter()
            .chain([&a.o_proj])
            .chain(self.mlp.linears())
            .flat_map(linear_tensors)
            .chain([
                &self.input_layernorm.weight,
                &self.post_attention_layernorm.weight,
            ])
            .chain(a.q_norm.iter().chain(&a.k_norm).map(|n| &n.weight))
            .any(|t| t.requires_grad())
    }

    /// One self-attention layer under `p` (`layers.N`), for families that assemble their own
    /// layer stack around it.
    pub fn new(p: &Path, c: &DecoderConfig, opts: &DecoderOptions, init: ParamInit) -> Self {
        DecoderLayer {
            input_layernorm: RmsNorm::new(&(p / "input_layernorm"), c.hidden_size, c.rms_norm_eps),
            self_attn: Attention::new(&(p / "self_attn"), c, opts, init),
            post_attention_layernorm: RmsNorm::new(
                &(p / "post_attention_layernorm"),
                c.hidden_size,
                c.rms_norm_eps,
            ),
            mlp: Mlp::with_options(&(p / "mlp"), c, opts, init),
        }
    }

    /// Visits the layer's linears (seven, or four with fused projections), named under
    /// `prefix` (`model.layers.N`) as [`Decoder::visit_linears`] names them.
    pub fn visit_linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        let a = &mut self.self_attn;
        match &mut a.qkv {
            Qkv::Split { q, k, v } => {
                f(&format!("{prefix}.self_attn.q_proj"), q);
                f(&format!("{prefix}.self_attn.k_proj"), k);
                f(&format!("{prefix}.self_attn.v_proj"), v);
            }
            Qkv::Fused(qkv) => f(&format!("{prefix}.self_attn.qkv_proj"), qkv),
        }
        f(&format!("{prefix}.self_attn.o_proj"), &mut a.o_proj);
        self.mlp.visit_linears(&format!("{prefix}.mlp"), f);
    }

    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let h = x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x), cos, sin, mask, cache);
        let out = self.mlp.forward(&self.post_attention_layernorm.forward(&h));
        h + out
    }
}

/// Embeddings, layers and final norm (the Hub's `model.*`), plus the `lm_head`.
pub struct Decoder {
    pub config: DecoderConfig,
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Linear>,
    /// Recompute each layer in backward instead of keeping its activations.
    gradient_checkpointing: bool,
}

impl Decoder {
    /// `model` is the path of `embed_tokens` / `layers` / `norm`; `lm_head` is the head's.
    pub fn new(model: &Path, lm_head: &Path, c: &DecoderConfig, init: ParamInit) -> Self {
        Decoder::new_with(model, lm_head, c, &DecoderOptions::default(), init)
    }

    /// [`Decoder::new`] with [`DecoderOptions`].
    pub fn new_with(
        model: &Path,
        lm_head: &Path,
        c: &DecoderConfig,
        opts: &DecoderOptions,
        init: ParamInit,
    ) -> Self {
        Decoder {
            embed_tokens: Embedding::new(
                &(model / "embed_tokens"),
                c.vocab_size,
                c.hidden_size,
                init,
            ),
            layers: (0..c.num_layers)
                .map(|i| DecoderLayer::new(&(model / "layers" / i), c, opts, init))
                .collect(),
            norm: RmsNorm::new(&(model / "norm"), c.hidden_size, c.rms_norm_eps),
            lm_head: (!c.tie_word_embeddings)
                .then(|| Linear::new(lm_head, c.hidden_size, c.vocab_size, false, init)),
            config: c.clone(),
            gradient_checkpointing: false,
        }
    }

    /// Trades compute for memory in training: each layer keeps only its input and runs
    /// again during backward.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Visits every linear layer with its Hub name; `model` / `lm_head` are the prefixes the
    /// decoder was built under (`model`, `lm_head` for most families).
    pub fn visit_linears(
        &mut self,
        model: &str,
        lm_head: &str,
        f: &mut dyn FnMut(&str, &mut Linear),
    ) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.visit_linears(&format!("{model}.layers.{i}"), f);
        }
        if let Some(head) = &mut self.lm_head {
            f(lm_head, head);
        }
    }

    pub fn embed(&self, ids: &Tensor) -> Tensor {
        self.embed_tokens.forward(ids)
    }

    /// Runs the layers and the final norm on `[B, T, H]` embeddings.
    pub fn hidden_states(
        &self,
        embeds: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
    ) -> Tensor {
        self.hidden_states_hooked(embeds, cos, sin, mask, None)
    }

    /// [`Decoder::hidden_states`] with `hook` applied to each layer's output (outside any
    /// gradient checkpoint, so what it adds keeps its own graph).
    pub fn hidden_states_hooked(
        &self,
        embeds: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        hook: Option<LayerHook>,
    ) -> Tensor {
        let mut h = embeds.shallow_clone();
        let checkpointing = self.gradient_checkpointing && grad_enabled();
        for (i, layer) in self.layers.iter().enumerate() {
            h = if checkpointing && (h.requires_grad() || layer.has_trainable()) {
                let layer = layer.shallow_clone();
                let (cos, sin) = (cos.shallow_clone(), sin.shallow_clone());
                let mask = mask.map(Tensor::shallow_clone);
                checkpoint(&[&h], move |xs| {
                    layer.forward(&xs[0], &cos, &sin, mask.as_ref(), None)
                })
            } else {
                layer.forward(&h, cos, sin, mask, None)
            };
            if let Some(hook) = hook {
                h = hook(i, h);
            }
        }
        self.norm.forward(&h)
    }

    /// Like [`Decoder::hidden_states`] for generation: keys and values are read from and
    /// appended to `cache` (one slot per layer), so each new token costs one position.
    /// `mask` (`[B, 1, T, cached + T]`, true = attend) is needed only when some cached keys
    /// are padding.
    pub fn hidden_states_cached(
        &self,
        embeds: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Tensor {
        self.hidden_states_cached_hooked(embeds, cos, sin, mask, cache, None)
    }

    fn hidden_states_cached_hooked(
        &self,
        embeds: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        hook: Option<LayerHook>,
    ) -> Tensor {
        cache.layers.resize_with(self.layers.len(), || None);
        let mut h = embeds.shallow_clone();
        for (i, (layer, slot)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            h = layer.forward(&h, cos, sin, mask, Some(slot));
            if let Some(hook) = hook {
                h = hook(i, h);
            }
        }
        self.norm.forward(&h)
    }

    /// Generation prefill of right-padded prompt embeddings `[B, T, H]` whose row `i` has
    /// `lengths[i]` real tokens: fills the cache and returns the logits of each row's last
    /// real token, `[B, vocab]`. `next_positions` are the positions each row's first new token
    /// takes (the family's position rule). Causal attention keeps each row's real tokens
    /// blind to its padding; [`DecodeState::valid`] keeps later tokens blind to it.
    pub fn prefill(
        &self,
        embeds: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        lengths: &[usize],
        next_positions: Vec<i64>,
    ) -> Result<(Tensor, DecodeState)> {
        self.prefill_hooked(embeds, cos, sin, lengths, next_positions, None)
    }

    /// [`Decoder::prefill`] with `hook` applied to each layer's output, as in
    /// [`Decoder::hidden_states_hooked`].
    pub fn prefill_hooked(
        &self,
        embeds: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        lengths: &[usize],
        next_positions: Vec<i64>,
        hook: Option<LayerHook>,
    ) -> Result<(Tensor, DecodeState)> {
        let (b, t, h) = embeds.size3()?;
        ensure!(
            lengths.len() == b as usize && next_positions.len() == b as usize,
            "{} prompt lengths and {} positions for a batch of {b}",
            lengths.len(),
            next_positions.len()
        );
        ensure!(
            lengths.iter().all(|&l| l >= 1 && l as i64 <= t),
            "prompt lengths {lengths:?} do not fit a batch of {t} positions"
        );
        let mut state = DecodeState {
            next_positions,
            ..DecodeState::default()
        };
        let hidden =
            self.hidden_states_cached_hooked(embeds, cos, sin, None, &mut state.cache, hook);
        let device = embeds.device();
        let lens: Vec<i64> = lengths.iter().map(|&l| l as i64).collect();
        let lens = Tensor::from_slice(&lens).to_device(device);
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

    /// Feeds one token per row (`ids: [B, 1]`, rotary tables `[B, 1, D]` at each row's
    /// `next_positions`) through the cache; returns the next logits `[B, vocab]`.
    pub fn decode_step(
        &self,
        state: &mut DecodeState,
        ids: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Tensor {
        let embeds = self.embed(ids);
        let mask = state.valid.take().map(|valid| {
            let b = valid.size()[0];
            let grown = Tensor::cat(
                &[&valid, &Tensor::ones([b, 1], (Kind::Bool, valid.device()))],
                1,
            );
            let mask = grown.view([b, 1, 1, -1]);
            state.valid = Some(grown);
            mask
        });
        let hidden = self.hidden_states_cached(&embeds, cos, sin, mask.as_ref(), &mut state.cache);
        state.next_positions.iter_mut().for_each(|p| *p += 1);
        self.logits(&hidden.squeeze_dim(1))
    }

    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.linear::<Tensor>(&self.embed_tokens.weight, None),
        }
    }
}

/// Standard 1-D rotary tables for `positions: [B, T]` → `cos`, `sin`: `[B, T, D]` in `kind`.
pub fn rope_cos_sin(positions: &Tensor, inv_freq: &Tensor, kind: Kind) -> (Tensor, Tensor) {
    let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq;
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
}
