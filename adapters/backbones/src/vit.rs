//! Pieces shared by the CLIP and SigLIP vision towers: their encoder layers are the same
//! pre-norm ViT block (LayerNorm → bidirectional attention with biased q/k/v/out → residual →
//! LayerNorm → two-layer MLP → residual) and differ only in the MLP activation.

use anyhow::{bail, Result};
use lmms_ft_core::autograd::{checkpoint, grad_enabled, linear_tensors, ShallowClone};
use lmms_ft_core::nn::{linear_params, sdpa, LayerNorm, Linear, ParamInit};
use serde_json::Value;
use tch::nn::{Init, Path};
use tch::Tensor;

/// The `hidden_act` / `projector_hidden_act` values of `transformers`' `ACT2FN` that the
/// LLaVA family's towers and projectors use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact (erf) GELU.
    Gelu,
    /// `gelu_pytorch_tanh`, `gelu_new`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: `x * sigmoid(1.702 x)`, CLIP's.
    QuickGelu,
    Silu,
    Relu,
    /// `linear`: the identity (transformers' `LinearActivation`).
    Identity,
}

impl Activation {
    pub fn parse(name: &str) -> Result<Activation> {
        Ok(match name {
            "gelu" => Activation::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "silu" | "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            "linear" => Activation::Identity,
            other => bail!("unsupported activation `{other}` (supported: gelu, gelu_pytorch_tanh, gelu_new, quick_gelu, silu, relu, linear)"),
        })
    }

    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
            Activation::Silu => x.silu(),
            Activation::Relu => x.relu(),
            Activation::Identity => x.shallow_clone(),
        }
    }
}

/// The tch initialiser for a weight under `init` (biases and norms have fixed inits).
pub(crate) fn weight_init(init: ParamInit) -> Init {
    match init {
        ParamInit::Zeros => Init::Const(0.0),
        ParamInit::Normal { std } => Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    }
}

pub use lmms_ft_core::hf_json::{boolean, float, int, string};

/// Sizes of one ViT encoder stack.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
}

impl EncoderConfig {
    /// Reads the encoder keys of a CLIP or SigLIP `vision_config`; the two towers differ only
    /// in the defaults `transformers` gives absent keys.
    pub fn from_hf_json(v: &Value, default_eps: f64, default_act: &str) -> Result<EncoderConfig> {
        let c = EncoderConfig {
            hidden_size: int(v, "hidden_size", 768)?,
            intermediate_size: int(v, "intermediate_size", 3072)?,
            num_layers: int(v, "num_hidden_layers", 12)?,
            num_heads: int(v, "num_attention_heads", 12)?,
            layer_norm_eps: float(v, "layer_norm_eps", default_eps)?,
            hidden_act: Activation::parse(string(v, "hidden_act", default_act)?)?,
        };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_heads <= 0 || self.hidden_size % self.num_heads != 0 {
            bail!(
                "vision hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_heads
            );
        }
        Ok(())
    }

    /// Parameters of the layer stack (LayerNorms, attention and MLP, all with biases).
    pub fn num_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let i = self.intermediate_size as u64;
        let layer = 4 * h
            + 4 * linear_params(h, h, true)
            + linear_params(h, i, true)
            + linear_params(i, h, true);
        self.num_layers as u64 * layer
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
}

impl ShallowClone for Attention {
    fn shallow_clone(&self) -> Self {
        Attention {
            q_proj: self.q_proj.shallow_clone(),
            k_proj: self.k_proj.shallow_clone(),
            v_proj: self.v_proj.shallow_clone(),
            out_proj: self.out_proj.shallow_clone(),
            heads: self.heads,
        }
    }
}

impl Attention {
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, t, h) = x.size3().expect("[B, T, H]");
        let d = h / self.heads;
        let split = |y: Tensor| y.view([b, t, self.heads, d]).transpose(1, 2);
        let q = split(self.q_proj.forward(x));
        let k = split(self.k_proj.forward(x));
        let v = split(self.v_proj.forward(x));
        let out = sdpa(&q, &k, &v, None, false, (d as f64).powf(-0.5));
        self.out_proj
            .forward(&out.transpose(1, 2).reshape([b, t, h]))
    }
}

/// One encoder block, parameters named as in `CLIPEncoderLayer` / `SiglipEncoderLayer`.
pub struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl ShallowClone for EncoderLayer {
    fn shallow_clone(&self) -> Self {
        EncoderLayer {
            layer_norm1: self.layer_norm1.shallow_clone(),
            self_attn: self.self_attn.shallow_clone(),
            layer_norm2: self.layer_norm2.shallow_clone(),
            fc1: self.fc1.shallow_clone(),
            fc2: self.fc2.shallow_clone(),
            act: self.act,
        }
    }
}

impl EncoderLayer {
    /// Whether any parameter of the block (LoRA factors included) trains.
    pub fn has_trainable(&self) -> bool {
        let a = &self.self_attn;
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.out_proj,
            &self.fc1,
            &self.fc2,
        ]
        .into_iter()
        .flat_map(linear_tensors)
        .chain([
            &self.layer_norm1.weight,
            &self.layer_norm1.bias,
            &self.layer_norm2.weight,
            &self.layer_norm2.bias,
        ])
        .any(|t| t.requires_grad())
    }

    pub fn new(p: &Path, c: &EncoderConfig, init: ParamInit) -> EncoderLayer {
        let h = c.hidden_size;
        let a = p / "self_attn";
        let m = p / "mlp";
        EncoderLayer {
            layer_norm1: LayerNorm::new(&(p / "layer_norm1"), h, c.layer_norm_eps),
            self_attn: Attention {
                q_proj: Linear::new(&(&a / "q_proj"), h, h, true, init),
                k_proj: Linear::new(&(&a / "k_proj"), h, h, true, init),
                v_proj: Linear::new(&(&a / "v_proj"), h, h, true, init),
                out_proj: Linear::new(&(&a / "out_proj"), h, h, true, init),
                heads: c.num_heads,
            },
            layer_norm2: LayerNorm::new(&(p / "layer_norm2"), h, c.layer_norm_eps),
            fc1: Linear::new(&(&m / "fc1"), h, c.intermediate_size, true, init),
            fc2: Linear::new(&(&m / "fc2"), c.intermediate_size, h, true, init),
            act: c.hidden_act,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = x + self.self_attn.forward(&self.layer_norm1.forward(x));
        let y = self.fc2.forward(
            &self
                .act
                .apply(&self.fc1.forward(&self.layer_norm2.forward(&h))),
        );
        h + y
    }
}

/// Calls `f` with the Hub name (`{prefix}.encoder.layers.N.self_attn.q_proj`, ...) of every
/// linear layer of an encoder stack, so a trainer can adapt or merge them, and so PEFT
/// target lists written for the LLM can tell its `q_proj` from the tower's.
pub fn visit_encoder_linears(
    layers: &mut [EncoderLayer],
    prefix: &str,
    f: &mut dyn FnMut(&str, &mut Linear),
) {
    for (i, layer) in layers.iter_mut().enumerate() {
        let p = format!("{prefix}.encoder.layers.{i}");
        let a = &mut layer.self_attn;
        f(&format!("{p}.self_attn.q_proj"), &mut a.q_proj);
        f(&format!("{p}.self_attn.k_proj"), &mut a.k_proj);
        f(&format!("{p}.self_attn.v_proj"), &mut a.v_proj);
        f(&format!("{p}.self_attn.out_proj"), &mut a.out_proj);
        f(&format!("{p}.mlp.fc1"), &mut layer.fc1);
        f(&format!("{p}.mlp.fc2"), &mut layer.fc2);
    }
}

/// Builds the `encoder.layers.N` stack under `p`.
pub fn encoder_layers(p: &Path, c: &EncoderConfig, init: ParamInit) -> Vec<EncoderLayer> {
    let layers = p / "encoder" / "layers";
    (0..c.num_layers)
        .map(|i| EncoderLayer::new(&(&layers / i), c, init))
        .collect()
}

/// A patch larger than the image would make the conv return no tokens at all.
pub fn check_patching(tower: &str, image_size: i64, patch_size: i64) -> Result<()> {
    if patch_size <= 0 || image_size < patch_size {
        bail!("{tower} image_size {image_size} is smaller than patch_size {patch_size}");
    }
    Ok(())
}

/// The towers' conv patch embedding, as `[N, patches, H]` in the weight's dtype. The towers
/// do not interpolate positions (as LLaVA runs them), so `pixels` must be `[N, C, S, S]` at
/// the configured `image_size`; channels and patch size come from the conv weight.
pub fn embed_patches(
    tower: &str,
    pixels: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    image_size: i64,
) -> Result<Tensor> {
    let w = weight.size();
    let (channels, patch) = (w[1], w[2]);
    let size = pixels.size();
    if size.len() != 4 || size[1] != channels || size[2] != image_size || size[3] != image_size {
        bail!("{tower} tower expects pixel values [N, {channels}, {image_size}, {image_size}], got {size:?}");
    }
    Ok(pixels
        .to_kind(weight.kind())
        .conv2d(weight, bias, [patch; 2], [0; 2], [1; 2], 1)
        .flatten(2, -1)
        .transpose(1, 2))
}

/// Resolves each of `transformers`' `hidden_states[i]` indices with [`resolve_layer`].
pub fn resolve_layers(indices: &[i64], num_layers: i64) -> Result<Vec<usize>> {
    indices
        .iter()
        .map(|&i| resolve_layer(i, num_layers))
        .collect()
}

/// Resolves `transformers`' `hidden_states[i]` indices (0 = the embeddings, `n` = after the
/// last of `n` layers; negative counts from the end) to non-negative ones.
pub fn resolve_layer(index: i64, num_layers: i64) -> Result<usize> {
    let n = num_layers + 1;
    let i = if index < 0 { n + index } else { index };
    if !(0..n).contains(&i) {
        bail!("vision_feature_layer {index} is out of range for a tower with {num_layers} layers");
    }
    Ok(i as usize)
}

/// Runs `layers` on `x`, returning the hidden states at the requested (resolved) indices,
/// in request order; layers past the deepest requested one are not run. With
/// `checkpointing` (and grad enabled) each block that has something to train keeps only its
/// input and runs again in backward.
pub fn select_hidden_states(
    x: Tensor,
    layers: &[EncoderLayer],
    wanted: &[usize],
    checkpointing: bool,
) -> Vec<Tensor> {
    let deepest = wanted.iter().copied().max().unwrap_or(0);
    let checkpointing = checkpointing && grad_enabled();
    let mut states = Vec::with_capacity(deepest + 1);
    states.push(x);
    for layer in layers.iter().take(deepest) {
        let h = states.last().expect("non-empty");
        let next = if checkpointing && (h.requires_grad() || layer.has_trainable()) {
            let layer = layer.shallow_clone();
            checkpoint(&[h], move |xs| layer.forward(&xs[0]))
        } else {
            layer.forward(h)
        };
        states.push(next);
    }
    wanted.iter().map(|&i| states[i].shallow_clone()).collect()
}
