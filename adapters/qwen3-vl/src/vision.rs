//! The Qwen3-VL vision transformer: a 3-D patch embedding with bias (two frames × 16 × 16
//! patches), a learned square position table bilinearly interpolated (corners aligned) to each
//! image's grid, LayerNorm blocks with a `gelu_pytorch_tanh` MLP and attention confined to
//! each image or video frame (the 2-D rotary, layout and attention are Qwen2-VL's, shared),
//! a merger that folds each 2 × 2 block of patches into one LLM token, and the DeepStack
//! mergers that turn the outputs of `deepstack_visual_indexes` blocks into features for the
//! first LLM layers.

use lmms_ft_backbones::qwen_vl::vision::{patch_positions, rotary_tables, segment_attention};
use lmms_ft_core::autograd::{checkpoint, grad_enabled, linear_tensors, ShallowClone};
use lmms_ft_core::nn::{LayerNorm, Linear, ParamInit};
use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

use crate::config::VisionConfig;

fn activation(name: &str, x: &Tensor) -> Tensor {
    match name {
        "gelu_pytorch_tanh" => x.gelu("tanh"),
        "quick_gelu" => x * (x * 1.702).sigmoid(),
        "silu" => x.silu(),
        _ => x.gelu("none"),
    }
}

struct Block {
    norm1: LayerNorm,
    norm2: LayerNorm,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
}

impl Block {
    fn new(p: &Path, c: &VisionConfig, init: ParamInit) -> Block {
        let e = c.hidden_size;
        Block {
            norm1: LayerNorm::new(&(p / "norm1"), e, 1e-6),
            norm2: LayerNorm::new(&(p / "norm2"), e, 1e-6),
            qkv: Linear::new(&(p / "attn" / "qkv"), e, 3 * e, true, init),
            proj: Linear::new(&(p / "attn" / "proj"), e, e, true, init),
            fc1: Linear::new(
                &(p / "mlp" / "linear_fc1"),
                e,
                c.intermediate_size,
                true,
                init,
            ),
            fc2: Linear::new(
                &(p / "mlp" / "linear_fc2"),
                c.intermediate_size,
                e,
                true,
                init,
            ),
        }
    }

    /// Whether any parameter of the block (LoRA factors included) trains.
    fn has_trainable(&self) -> bool {
        [&self.qkv, &self.proj, &self.fc1, &self.fc2]
            .into_iter()
            .flat_map(linear_tensors)
            .chain([
                &self.norm1.weight,
                &self.norm1.bias,
                &self.norm2.weight,
                &self.norm2.bias,
            ])
            .any(|t| t.requires_grad())
    }

    fn forward(
        &self,
        c: &VisionConfig,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &[i64],
    ) -> Tensor {
        let x = x + segment_attention(
            &self.qkv,
            &self.proj,
            &self.norm1.forward(x),
            c.num_heads,
            cos,
            sin,
            segments,
        );
        let h = self.norm2.forward(&x);
        &x + self
            .fc2
            .forward(&activation(&c.hidden_act, &self.fc1.forward(&h)))
    }
}

impl ShallowClone for Block {
    fn shallow_clone(&self) -> Self {
        Block {
            norm1: self.norm1.shallow_clone(),
            norm2: self.norm2.shallow_clone(),
            qkv: self.qkv.shallow_clone(),
            proj: self.proj.shallow_clone(),
            fc1: self.fc1.shallow_clone(),
            fc2: self.fc2.shallow_clone(),
        }
    }
}

/// LayerNorm → fc1 → GELU → fc2 over each merge group. The final merger normalises each
/// patch before grouping; the DeepStack ones (`postshuffle`) normalise the whole group.
struct Merger {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    postshuffle: bool,
}

impl Merger {
    fn new(p: &Path, c: &VisionConfig, postshuffle: bool, init: ParamInit) -> Merger {
        let merged = c.hidden_size * c.spatial_merge_size * c.spatial_merge_size;
        let norm_dim = if postshuffle { merged } else { c.hidden_size };
        Merger {
            norm: LayerNorm::new(&(p / "norm"), norm_dim, 1e-6),
            fc1: Linear::new(&(p / "linear_fc1"), merged, merged, true, init),
            fc2: Linear::new(&(p / "linear_fc2"), merged, c.out_hidden_size, true, init),
            postshuffle,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let merged = self.fc1.in_features();
        let x = if self.postshuffle {
            self.norm.forward(&x.view([-1, merged]))
        } else {
            self.norm.forward(x).view([-1, merged])
        };
        self.fc2.forward(&self.fc1.forward(&x).gelu("none"))
    }
}

/// Vision tokens of a batch's images or videos: the merged final features (`[tokens,
/// out_dim]`, in grid order) and one DeepStack feature of the same shape per
/// `deepstack_visual_indexes` entry.
pub struct VisionOutput {
    pub tokens: Tensor,
    pub deepstack: Vec<Tensor>,
}

pub struct VisionTower {
    config: VisionConfig,
    patch_weight: Tensor,
    patch_bias: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    merger: Merger,
    deepstack_mergers: Vec<Merger>,
    /// Recompute each block in backward instead of keeping its activations.
    gradient_checkpointing: bool,
}

impl VisionTower {
    pub fn new(p: &Path, c: &VisionConfig, init: ParamInit) -> VisionTower {
        let e = c.hidden_size;
        let init_w = match init {
            ParamInit::Zeros => Init::Const(0.0),
            ParamInit::Normal { std } => Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        };
        let patch = p / "patch_embed" / "proj";
        VisionTower {
            patch_weight: patch.var(
                "weight",
                &[
                    e,
                    c.in_channels,
                    c.temporal_patch_size,
                    c.patch_size,
                    c.patch_size,
                ],
                init_w,
            ),
            patch_bias: patch.var("bias", &[e], Init::Const(0.0)),
            pos_embed: (p / "pos_embed").var("weight", &[c.num_position_embeddings, e], init_w),
            blocks: (0..c.depth)
                .map(|i| Block::new(&(p / "blocks" / i), c, init))
                .collect(),
            merger: Merger::new(&(p / "merger"), c, false, init),
            deepstack_mergers: (0..c.deepstack_visual_indexes.len())
                .map(|i| Merger::new(&(p / "deepstack_merger_list" / i), c, true, init))
                .collect(),
            config: c.clone(),
            gradient_checkpointing: false,
        }
    }

    /// Trades compute for memory in training: each block keeps only its input and runs
    /// again during backward.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Visits every linear layer with its Hub name under `prefix` (`model.visual`).
    pub fn visit_linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("{prefix}.blocks.{i}");
            f(&format!("{p}.attn.qkv"), &mut b.qkv);
            f(&format!("{p}.attn.proj"), &mut b.proj);
            f(&format!("{p}.mlp.linear_fc1"), &mut b.fc1);
            f(&format!("{p}.mlp.linear_fc2"), &mut b.fc2);
        }
        let mergers = std::iter::once((format!("{prefix}.merger"), &mut self.merger)).chain(
            self.deepstack_mergers
                .iter_mut()
                .enumerate()
                .map(|(i, m)| (format!("{prefix}.deepstack_merger_list.{i}"), m)),
        );
        for (p, m) in mergers {
            f(&format!("{p}.linear_fc1"), &mut m.fc1);
            f(&format!("{p}.linear_fc2"), &mut m.fc2);
        }
    }

    /// Bilinear taps of the learned position table for every patch (transformers'
    /// `get_vision_interpolation_indices_and_weights`, corners aligned): four table rows and
    /// their weights, computed in f32 in the same order as torch.
    fn interpolation(&self, grids: &[[i64; 3]], positions: &[[i64; 2]]) -> (Vec<i64>, Vec<f32>) {
        let side = (self.config.num_position_embeddings as f64).sqrt() as i64;
        let taps = |index: i64, size: i64| -> [(i64, f32); 2] {
            let src = (index as f32 * (side - 1) as f32) / (size - 1).max(1) as f32;
            let floor = src.floor();
            let at = |offset: i64| {
                let distance = (src - floor - offset as f32).abs();
                let tap = (floor as i64 + offset).clamp(0, side - 1);
                (tap, (1.0 - distance).max(0.0))
            };
            [at(0), at(1)]
        };
        let mut indices = Vec::with_capacity(positions.len() * 4);
        let mut weights = Vec::with_capacity(positions.len() * 4);
        let mut at = positions.iter();
        for &[t, h, w] in grids {
            for &[row, col] in at.by_ref().take((t * h * w) as usize) {
                for (hi, hw) in taps(row, h) {
                    for (wi, ww) in taps(col, w) {
                        indices.push(hi * side + wi);
                        weights.push(hw * ww);
                    }
                }
            }
        }
        (indices, weights)
    }

    /// `pixels: [patches, C·T·P·P]` → merged tokens and DeepStack features, in grid order.
    pub fn forward(&self, pixels: &Tensor, grids: &[[i64; 3]]) -> VisionOutput {
        let c = &self.config;
        let device = pixels.device();
        let kind = self.patch_weight.kind();
        let e = c.hidden_size;
        let (positions, segments) = patch_positions(grids, c.spatial_merge_size);
        // A Conv3d whose stride equals its kernel is a matmul over flattened patches.
        let x = pixels
            .to_kind(kind)
            .matmul(&self.patch_weight.view([e, -1]).tr())
            + &self.patch_bias;
        let (indices, weights) = self.interpolation(grids, &positions);
        let n = positions.len() as i64;
        let table = self
            .pos_embed
            .index_select(0, &Tensor::from_slice(&indices).to_device(device))
            .view([n, 4, e]);
        let weights = Tensor::from_slice(&weights)
            .to_device(device)
            .view([n, 4, 1]);
        let pos = (table * weights).sum_dim_intlist([1i64].as_slice(), false, None::<Kind>);
        let mut x = x + pos.to_kind(kind);
        let head_dim = e / c.num_heads;
        let (cos, sin) = rotary_tables(&positions, head_dim, c.rope_theta, device);
        let checkpointing = self.gradient_checkpointing && grad_enabled();
        let mut deepstack = Vec::with_capacity(self.deepstack_mergers.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = if checkpointing && (x.requires_grad() || block.has_trainable()) {
                let (block, config) = (block.shallow_clone(), c.clone());
                let (cos, sin) = (cos.shallow_clone(), sin.shallow_clone());
                let segments = segments.clone();
                checkpoint(&[&x], move |xs| {
                    block.forward(&config, &xs[0], &cos, &sin, &segments)
                })
            } else {
                block.forward(c, &x, &cos, &sin, &segments)
            };
            if let Some(k) = c
                .deepstack_visual_indexes
                .iter()
                .position(|&d| d == i as i64)
            {
                deepstack.push(self.deepstack_mergers[k].forward(&x));
            }
        }
        VisionOutput {
            tokens: self.merger.forward(&x),
            deepstack,
        }
    }
}
