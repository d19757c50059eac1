//! `MllamaVisionModel` and the projector: per tile, a conv patch embedding, a gated
//! pre-tile embedding (by aspect ratio), a class token, gated position + tile-position
//! embeddings, then the local encoder over all tiles of an image together, a gated
//! post-tile embedding and the gated global encoder; the output concatenates the global
//! encoder's states with the local encoder's at `intermediate_layers_indices`.
//!
//! Attention follows transformers' mask exactly, quirk included: each tile's token count is
//! padded to a multiple of 8, and a pair of tokens is masked only when *both* are padding
//! (padded patches or padding tiles), so real tokens still attend to padding.

use anyhow::{ensure, Result};
use lmms_ft_backbones::vit::Activation;
use lmms_ft_core::autograd::{checkpoint, grad_enabled, linear_tensors, ShallowClone};
use lmms_ft_core::nn::{sdpa, LayerNorm, Linear, ParamInit};
use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

use crate::config::VisionConfig;

fn init_of(init: ParamInit) -> Init {
    match init {
        ParamInit::Zeros => Init::Const(0.0),
        ParamInit::Normal { std } => Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    }
}

/// One encoder layer (`MllamaVisionEncoderLayer`); the global encoder's are gated.
pub struct VisionLayer {
    input_layernorm: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    /// `(gate_attn, gate_ffn)`.
    gates: Option<(Tensor, Tensor)>,
    heads: i64,
    act: Activation,
}

impl ShallowClone for VisionLayer {
    fn shallow_clone(&self) -> Self {
        VisionLayer {
            input_layernorm: self.input_layernorm.shallow_clone(),
            q_proj: self.q_proj.shallow_clone(),
            k_proj: self.k_proj.shallow_clone(),
            v_proj: self.v_proj.shallow_clone(),
            o_proj: self.o_proj.shallow_clone(),
            post_attention_layernorm: self.post_attention_layernorm.shallow_clone(),
            fc1: self.fc1.shallow_clone(),
            fc2: self.fc2.shallow_clone(),
            gates: self
                .gates
                .as_ref()
                .map(|(a, f)| (a.shallow_clone(), f.shallow_clone())),
            heads: self.heads,
            act: self.act,
        }
    }
}

impl VisionLayer {
    fn new(p: &Path, c: &VisionConfig, gated: bool, act: Activation, init: ParamInit) -> Self {
        let h = c.hidden_size;
        let a = p / "self_attn";
        let m = p / "mlp";
        VisionLayer {
            input_layernorm: LayerNorm::new(&(p / "input_layernorm"), h, c.norm_eps),
            q_proj: Linear::new(&(&a / "q_proj"), h, h, false, init),
            k_proj: Linear::new(&(&a / "k_proj"), h, h, false, init),
            v_proj: Linear::new(&(&a / "v_proj"), h, h, false, init),
            o_proj: Linear::new(&(&a / "o_proj"), h, h, false, init),
            post_attention_layernorm: LayerNorm::new(
                &(p / "post_attention_layernorm"),
                h,
                c.norm_eps,
            ),
            fc1: Linear::new(&(&m / "fc1"), h, c.intermediate_size, true, init),
            fc2: Linear::new(&(&m / "fc2"), c.intermediate_size, h, true, init),
            gates: gated.then(|| {
                let g = Init::Const(std::f64::consts::FRAC_PI_4);
                (p.var("gate_attn", &[1], g), p.var("gate_ffn", &[1], g))
            }),
            heads: c.num_heads,
            act,
        }
    }

    fn has_trainable(&self) -> bool {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.fc1,
            &self.fc2,
        ]
        .into_iter()
        .flat_map(linear_tensors)
        .chain([
            &self.input_layernorm.weight,
            &self.post_attention_layernorm.weight,
        ])
        .chain(self.gates.iter().flat_map(|(a, f)| [a, f]))
        .any(|t| t.requires_grad())
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Tensor {
        let (b, t, h) = x.size3().expect("[B, T, H]");
        let d = h / self.heads;
        let y = self.input_layernorm.forward(x);
        let split = |y: Tensor| y.view([b, t, self.heads, d]).transpose(1, 2);
        let q = split(self.q_proj.forward(&y));
        let k = split(self.k_proj.forward(&y));
        let v = split(self.v_proj.forward(&y));
        let attn = sdpa(&q, &k, &v, Some(mask), false, (d as f64).powf(-0.5));
        let mut attn = self
            .o_proj
            .forward(&attn.transpose(1, 2).reshape([b, t, h]));
        if let Some((g, _)) = &self.gates {
            attn = g.tanh() * attn;
        }
        let h1 = x + attn;
        let y = self.post_attention_layernorm.forward(&h1);
        let mut mlp = self.fc2.forward(&self.act.apply(&self.fc1.forward(&y)));
        if let Some((_, g)) = &self.gates {
            mlp = g.tanh() * mlp;
        }
        h1 + mlp
    }
}

/// Runs `layers`, keeping the outputs of the layers in `keep` (in order of `keep`).
fn run_layers(
    layers: &[VisionLayer],
    x: Tensor,
    mask: &Tensor,
    keep: &[i64],
    checkpointing: bool,
) -> (Tensor, Vec<Tensor>) {
    let checkpointing = checkpointing && grad_enabled();
    let mut kept: Vec<(i64, Tensor)> = Vec::new();
    let mut h = x;
    for (i, layer) in layers.iter().enumerate() {
        h = if checkpointing && (h.requires_grad() || layer.has_trainable()) {
            let layer = layer.shallow_clone();
            let mask = mask.shallow_clone();
            checkpoint(&[&h], move |xs| layer.forward(&xs[0], &mask))
        } else {
            layer.forward(&h, mask)
        };
        if keep.contains(&(i as i64)) {
            kept.push((i as i64, h.shallow_clone()));
        }
    }
    let ordered = keep
        .iter()
        .filter_map(|k| {
            kept.iter()
                .find(|(i, _)| i == k)
                .map(|(_, t)| t.shallow_clone())
        })
        .collect();
    (h, ordered)
}

/// `MllamaPrecomputedAspectRatioEmbedding` (gated).
struct TileEmbedding {
    embedding: Tensor,
    gate: Tensor,
}

impl TileEmbedding {
    fn new(p: &Path, c: &VisionConfig, init: ParamInit) -> Self {
        TileEmbedding {
            embedding: (p / "embedding").var(
                "weight",
                &[c.max_aspect_ratio_id() + 1, c.max_num_tiles * c.hidden_size],
                init_of(init),
            ),
            gate: p.var("gate", &[1], Init::Const(0.0)),
        }
    }

    /// `x: [BN, tiles, P, H]`, `ids: [BN]`.
    fn forward(&self, x: &Tensor, ids: &Tensor, tiles: i64, h: i64) -> Tensor {
        let e =
            Tensor::embedding(&self.embedding, ids, -1, false, false).reshape([-1, tiles, 1, h]);
        x + e * self.gate.tanh()
    }
}

pub struct VisionModel {
    config: VisionConfig,
    patch_embedding: Tensor,
    class_embedding: Tensor,
    pos_gate: Tensor,
    pos_embedding: Tensor,
    tile_pos_embedding: Tensor,
    pre_tile: TileEmbedding,
    post_tile: TileEmbedding,
    layernorm_pre: LayerNorm,
    layernorm_post: LayerNorm,
    pub layers: Vec<VisionLayer>,
    pub global_layers: Vec<VisionLayer>,
    gradient_checkpointing: bool,
}

impl VisionModel {
    /// Parameters under `p` (`vision_model`).
    pub fn new(p: &Path, c: &VisionConfig, init: ParamInit) -> Result<Self> {
        let act = Activation::parse(&c.hidden_act)?;
        let h = c.hidden_size;
        let n = c.num_patches();
        let ids = c.max_aspect_ratio_id() + 1;
        let w = init_of(init);
        let gp = p / "gated_positional_embedding";
        let local = p / "transformer" / "layers";
        let global = p / "global_transformer" / "layers";
        Ok(VisionModel {
            patch_embedding: (p / "patch_embedding").var(
                "weight",
                &[h, c.num_channels, c.patch_size, c.patch_size],
                w,
            ),
            class_embedding: p.var("class_embedding", &[h], w),
            pos_gate: gp.var("gate", &[1], Init::Const(0.0)),
            pos_embedding: gp.var("embedding", &[n, h], w),
            tile_pos_embedding: (&gp / "tile_embedding").var(
                "weight",
                &[ids, c.max_num_tiles * n * h],
                w,
            ),
            pre_tile: TileEmbedding::new(&(p / "pre_tile_positional_embedding"), c, init),
            post_tile: TileEmbedding::new(&(p / "post_tile_positional_embedding"), c, init),
            // `nn.LayerNorm(hidden)`: torch's default eps, not `norm_eps`.
            layernorm_pre: LayerNorm::new(&(p / "layernorm_pre"), h, 1e-5),
            layernorm_post: LayerNorm::new(&(p / "layernorm_post"), h, 1e-5),
            layers: (0..c.num_layers)
                .map(|i| VisionLayer::new(&(&local / i), c, false, act, init))
                .collect(),
            global_layers: (0..c.num_global_layers)
                .map(|i| VisionLayer::new(&(&global / i), c, true, act, init))
                .collect(),
            config: c.clone(),
            gradient_checkpointing: false,
        })
    }

    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// `pixels: [B, N, tiles, C, S, S]`, `aspect_ratio_ids: [B, N]`, `aspect_ratio_mask:
    /// [B, N, tiles]` → `[B, N, tiles, patches + 1, vision_output_dim]`.
    pub fn forward(
        &self,
        pixels: &Tensor,
        aspect_ratio_ids: &Tensor,
        aspect_ratio_mask: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.config;
        let size = pixels.size();
        ensure!(
            size.len() == 6
                && size[2] == c.max_num_tiles
                && size[3] == c.num_channels
                && size[4] == c.image_size
                && size[5] == c.image_size,
            "pixel values must be [B, images, {}, {}, {}, {}], got {size:?}",
            c.max_num_tiles,
            c.num_channels,
            c.image_size,
            c.image_size
        );
        let (b, n_img, tiles) = (size[0], size[1], size[2]);
        let bn = b * n_img;
        let h = c.hidden_size;
        let kind = self.patch_embedding.kind();
        let ids = aspect_ratio_ids.reshape([bn]);
        let x = pixels
            .reshape([bn * tiles, c.num_channels, c.image_size, c.image_size])
            .to_kind(kind)
            .conv2d(
                &self.patch_embedding,
                None::<&Tensor>,
                [c.patch_size; 2],
                [0; 2],
                [1; 2],
                1,
            )
            .flatten(2, -1)
            .transpose(1, 2);
        let patches = x.size()[1];
        let x = self
            .pre_tile
            .forward(&x.reshape([bn, tiles, patches, h]), &ids, tiles, h);
        let x = x.reshape([bn * tiles, patches, h]);
        let cls = self.class_embedding.expand([bn * tiles, 1, h], false);
        let x = Tensor::cat(&[&cls, &x], 1);
        let np = patches + 1;
        let x = x.reshape([bn, tiles, np, h]);
        let gate = self.pos_gate.tanh();
        let x = x + (gate.ones_like() - &gate) * self.pos_embedding.view([1, 1, np, h]);
        let tile_pos = Tensor::embedding(&self.tile_pos_embedding, &ids, -1, false, false)
            .reshape([bn, tiles, np, h]);
        let x = x + gate * tile_pos;
        let x = self.layernorm_pre.forward(&x);
        let pad = (8 - np % 8) % 8;
        let x = x.constant_pad_nd([0, 0, 0, pad]);
        let target = np + pad;
        let mask = self.attention_mask(aspect_ratio_mask, bn, tiles, target, kind);
        let x = x.view([bn, tiles * target, h]);
        let (x, kept) = run_layers(
            &self.layers,
            x,
            &mask,
            &c.intermediate_layers_indices,
            self.gradient_checkpointing,
        );
        let x = self
            .layernorm_post
            .forward(&x)
            .reshape([bn, tiles, target, h]);
        let x = self
            .post_tile
            .forward(&x, &ids, tiles, h)
            .reshape([bn, tiles * target, h]);
        let (x, _) = run_layers(
            &self.global_layers,
            x,
            &mask,
            &[],
            self.gradient_checkpointing,
        );
        let x = x
            .reshape([bn, tiles, target, h])
            .narrow(2, 0, np)
            .reshape([b, n_img, tiles, np, h]);
        let inter = Tensor::stack(&kept, -1)
            .reshape([bn, tiles, target, -1])
            .narrow(2, 0, np)
            .reshape([b, n_img, tiles, np, -1]);
        Ok(Tensor::cat(&[x, inter], -1))
    }

    /// `_prepare_aspect_ratio_attention_mask`: additive `[BN, 1, L, L]`, the dtype's
    /// minimum where both tokens are padding.
    fn attention_mask(
        &self,
        ar_mask: &Tensor,
        bn: i64,
        tiles: i64,
        target: i64,
        kind: Kind,
    ) -> Tensor {
        let device = ar_mask.device();
        let real = self.config.num_patches();
        let pad = target - real;
        // `attention_mask[:, :, -pad:] = 0`; with no padding that slice is the whole tile.
        let keep = if pad == 0 {
            Tensor::zeros([target], (kind, device))
        } else {
            Tensor::cat(
                &[
                    Tensor::ones([real], (kind, device)),
                    Tensor::zeros([pad], (kind, device)),
                ],
                0,
            )
        };
        let m = ar_mask.reshape([bn, tiles, 1, 1]).to_kind(kind) * keep.view([1, 1, target, 1]);
        let inv = (m.ones_like() - &m).reshape([bn, tiles * target, 1]);
        let min = finfo_min(kind);
        (inv.matmul(&inv.transpose(-1, -2)) * min).unsqueeze(1)
    }

    /// Hub names (`vision_model.transformer.layers.N.self_attn.q_proj`, ...).
    pub fn visit_linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        for (stack, layers) in [
            ("transformer", &mut self.layers),
            ("global_transformer", &mut self.global_layers),
        ] {
            for (i, l) in layers.iter_mut().enumerate() {
                let p = format!("{prefix}.{stack}.layers.{i}");
                f(&format!("{p}.self_attn.q_proj"), &mut l.q_proj);
                f(&format!("{p}.self_attn.k_proj"), &mut l.k_proj);
                f(&format!("{p}.self_attn.v_proj"), &mut l.v_proj);
                f(&format!("{p}.self_attn.o_proj"), &mut l.o_proj);
                f(&format!("{p}.mlp.fc1"), &mut l.fc1);
                f(&format!("{p}.mlp.fc2"), &mut l.fc2);
            }
        }
    }
}

/// The dtype's most negative finite value (`torch.finfo(dtype).min`).
pub fn finfo_min(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Half => -65504.0,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}
