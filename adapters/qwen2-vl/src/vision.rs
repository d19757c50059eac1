//! The Qwen2-VL / Qwen2.5-VL vision transformer: a 3-D patch embedding (two frames × 14 × 14
//! patches), 2-D rotary positions, attention confined to each image or video frame (and, in
//! Qwen2.5-VL, to 112-pixel windows except in `fullatt_block_indexes`), and a merger that
//! folds each 2 × 2 block of patches into one LLM token.

use lmms_ft_backbones::qwen_vl::vision::{patch_positions, rotary_tables, segment_attention};
use lmms_ft_core::autograd::{checkpoint, grad_enabled, linear_tensors, ShallowClone};
use lmms_ft_core::nn::{LayerNorm, Linear, ParamInit, RmsNorm};
use tch::nn::{Init, Path};
use tch::{Device, Tensor};

use crate::config::{Variant, VisionConfig};

enum Norm {
    Layer(LayerNorm),
    /// A layer norm sharing another's parameters; `nn::LayerNorm` cannot be built from
    /// existing tensors, and a checkpoint closure must own its parameters.
    LayerShared {
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    },
    Rms(RmsNorm),
}

impl Norm {
    fn new(p: &Path, dim: i64, variant: Variant) -> Norm {
        match variant {
            Variant::Qwen2Vl => Norm::Layer(LayerNorm::new(p, dim, 1e-6)),
            Variant::Qwen25Vl => Norm::Rms(RmsNorm::new(p, dim, 1e-6)),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Norm::Layer(n) => n.forward(x),
            // Exactly what nn::LayerNorm::forward does.
            Norm::LayerShared { weight, bias, eps } => {
                x.layer_norm([weight.size()[0]], Some(weight), Some(bias), *eps, true)
            }
            Norm::Rms(n) => n.forward(x),
        }
    }

    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Norm::Layer(LayerNorm { weight, bias, .. })
            | Norm::LayerShared { weight, bias, .. } => vec![weight, bias],
            Norm::Rms(n) => vec![&n.weight],
        }
    }
}

impl ShallowClone for Norm {
    fn shallow_clone(&self) -> Self {
        match self {
            Norm::Layer(LayerNorm {
                weight, bias, eps, ..
            })
            | Norm::LayerShared { weight, bias, eps } => Norm::LayerShared {
                weight: weight.shallow_clone(),
                bias: bias.shallow_clone(),
                eps: *eps,
            },
            Norm::Rms(n) => Norm::Rms(n.shallow_clone()),
        }
    }
}

fn activation(name: &str, x: &Tensor) -> Tensor {
    match name {
        "quick_gelu" => x * (x * 1.702).sigmoid(),
        "silu" => x.silu(),
        "gelu_pytorch_tanh" => x.gelu("tanh"),
        _ => x.gelu("none"),
    }
}

enum Mlp {
    /// Qwen2-VL: fc1 → act → fc2.
    Plain { fc1: Linear, fc2: Linear },
    /// Qwen2.5-VL: down(act(gate(x)) · up(x)), all with bias.
    Gated {
        gate_proj: Linear,
        up_proj: Linear,
        down_proj: Linear,
    },
}

impl Mlp {
    fn linears(&self) -> Vec<&Linear> {
        match self {
            Mlp::Plain { fc1, fc2 } => vec![fc1, fc2],
            Mlp::Gated {
                gate_proj,
                up_proj,
                down_proj,
            } => vec![gate_proj, up_proj, down_proj],
        }
    }
}

impl ShallowClone for Mlp {
    fn shallow_clone(&self) -> Self {
        match self {
            Mlp::Plain { fc1, fc2 } => Mlp::Plain {
                fc1: fc1.shallow_clone(),
                fc2: fc2.shallow_clone(),
            },
            Mlp::Gated {
                gate_proj,
                up_proj,
                down_proj,
            } => Mlp::Gated {
                gate_proj: gate_proj.shallow_clone(),
                up_proj: up_proj.shallow_clone(),
                down_proj: down_proj.shallow_clone(),
            },
        }
    }
}

struct Block {
    norm1: Norm,
    norm2: Norm,
    qkv: Linear,
    proj: Linear,
    mlp: Mlp,
}

impl Block {
    /// Whether any parameter of the block (LoRA factors included) trains.
    fn has_trainable(&self) -> bool {
        let mut linears = self.mlp.linears();
        linears.extend([&self.qkv, &self.proj]);
        linears
            .into_iter()
            .flat_map(linear_tensors)
            .chain(self.norm1.tensors())
            .chain(self.norm2.tensors())
            .any(|t| t.requires_grad())
    }
}

impl ShallowClone for Block {
    fn shallow_clone(&self) -> Self {
        Block {
            norm1: self.norm1.shallow_clone(),
            norm2: self.norm2.shallow_clone(),
            qkv: self.qkv.shallow_clone(),
            proj: self.proj.shallow_clone(),
            mlp: self.mlp.shallow_clone(),
        }
    }
}

pub struct VisionTower {
    config: VisionConfig,
    variant: Variant,
    patch_embed: Tensor,
    blocks: Vec<Block>,
    ln_q: Norm,
    merger_fc1: Linear,
    merger_fc2: Linear,
    /// Recompute each block in backward instead of keeping its activations.
    gradient_checkpointing: bool,
}

/// Host-side layout of one forward: rotary positions, attention segments and (Qwen2.5-VL)
/// the window permutation. Computed from the grids alone, before any tensor work.
struct Layout {
    positions: Vec<[i64; 2]>,
    frame_segments: Vec<i64>,
    window_segments: Vec<i64>,
    /// Permutation of merge units into window order (empty when unused).
    window_index: Vec<i64>,
}

impl VisionTower {
    pub fn new(p: &Path, c: &VisionConfig, variant: Variant, init: ParamInit) -> VisionTower {
        let e = c.embed_dim;
        let init_w = match init {
            ParamInit::Zeros => Init::Const(0.0),
            ParamInit::Normal { std } => Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        };
        let patch_embed = (p / "patch_embed" / "proj").var(
            "weight",
            &[
                e,
                c.in_channels,
                c.temporal_patch_size,
                c.patch_size,
                c.patch_size,
            ],
            init_w,
        );
        let blocks = (0..c.depth)
            .map(|i| {
                let b = p / "blocks" / i;
                let mlp = match variant {
                    Variant::Qwen2Vl => Mlp::Plain {
                        fc1: Linear::new(&(&b / "mlp" / "fc1"), e, c.mlp_dim, true, init),
                        fc2: Linear::new(&(&b / "mlp" / "fc2"), c.mlp_dim, e, true, init),
                    },
                    Variant::Qwen25Vl => Mlp::Gated {
                        gate_proj: Linear::new(
                            &(&b / "mlp" / "gate_proj"),
                            e,
                            c.mlp_dim,
                            true,
                            init,
                        ),
                        up_proj: Linear::new(&(&b / "mlp" / "up_proj"), e, c.mlp_dim, true, init),
                        down_proj: Linear::new(
                            &(&b / "mlp" / "down_proj"),
                            c.mlp_dim,
                            e,
                            true,
                            init,
                        ),
                    },
                };
                Block {
                    norm1: Norm::new(&(&b / "norm1"), e, variant),
                    norm2: Norm::new(&(&b / "norm2"), e, variant),
                    qkv: Linear::new(&(&b / "attn" / "qkv"), e, 3 * e, true, init),
                    proj: Linear::new(&(&b / "attn" / "proj"), e, e, true, init),
                    mlp,
                }
            })
            .collect();
        let merged = e * c.spatial_merge_size * c.spatial_merge_size;
        let m = p / "merger";
        VisionTower {
            patch_embed,
            blocks,
            ln_q: Norm::new(&(&m / "ln_q"), e, variant),
            merger_fc1: Linear::new(&(&m / "mlp" / 0), merged, merged, true, init),
            merger_fc2: Linear::new(&(&m / "mlp" / 2), merged, c.out_dim, true, init),
            config: c.clone(),
            variant,
            gradient_checkpointing: false,
        }
    }

    /// Trades compute for memory in training: each block keeps only its input and runs
    /// again during backward.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Visits every linear layer with its Hub name under `prefix` (`visual`).
    pub fn visit_linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("{prefix}.blocks.{i}");
            f(&format!("{p}.attn.qkv"), &mut b.qkv);
            f(&format!("{p}.attn.proj"), &mut b.proj);
            match &mut b.mlp {
                Mlp::Plain { fc1, fc2 } => {
                    f(&format!("{p}.mlp.fc1"), fc1);
                    f(&format!("{p}.mlp.fc2"), fc2);
                }
                Mlp::Gated {
                    gate_proj,
                    up_proj,
                    down_proj,
                } => {
                    f(&format!("{p}.mlp.gate_proj"), gate_proj);
                    f(&format!("{p}.mlp.up_proj"), up_proj);
                    f(&format!("{p}.mlp.down_proj"), down_proj);
                }
            }
        }
        f(&format!("{prefix}.merger.mlp.0"), &mut self.merger_fc1);
        f(&format!("{prefix}.merger.mlp.2"), &mut self.merger_fc2);
    }

    fn layout(&self, grids: &[[i64; 3]]) -> Layout {
        let (positions, frame_segments) = patch_positions(grids, self.config.spatial_merge_size);
        let (window_index, window_segments) = match self.variant {
            Variant::Qwen2Vl => (Vec::new(), Vec::new()),
            Variant::Qwen25Vl => self.windows(grids),
        };
        Layout {
            positions,
            frame_segments,
            window_segments,
            window_index,
        }
    }

    /// Qwen2.5-VL windows: merge units grouped into `window_size / patch / merge` squares,
    /// window by window, per frame. Returns the unit permutation and window lengths in patches.
    fn windows(&self, grids: &[[i64; 3]]) -> (Vec<i64>, Vec<i64>) {
        let c = &self.config;
        let m = c.spatial_merge_size;
        let win = c.window_size / m / c.patch_size;
        let unit = m * m;
        let mut index = Vec::new();
        let mut lengths = Vec::new();
        let mut base = 0;
        for &[t, h, w] in grids {
            let (lh, lw) = (h / m, w / m);
            let nwh = (lh + win - lh % win) / win;
            let nww = (lw + win - lw % win) / win;
            for f in 0..t {
                for wy in 0..nwh {
                    for wx in 0..nww {
                        let mut n = 0;
                        for y in wy * win..((wy + 1) * win).min(lh) {
                            for x in wx * win..((wx + 1) * win).min(lw) {
                                index.push(base + f * lh * lw + y * lw + x);
                                n += 1;
                            }
                        }
                        if n > 0 {
                            lengths.push(n * unit);
                        }
                    }
                }
            }
            base += t * lh * lw;
        }
        (index, lengths)
    }

    /// `pixels: [patches, C·T·P·P]` → `[patches / m², out_dim]` tokens, in grid order.
    pub fn forward(&self, pixels: &Tensor, grids: &[[i64; 3]]) -> Tensor {
        let c = &self.config;
        let device = pixels.device();
        let kind = self.patch_embed.kind();
        let layout = self.layout(grids);
        let e = c.embed_dim;
        // A Conv3d whose stride equals its kernel is a matmul over flattened patches.
        let mut x = pixels
            .to_kind(kind)
            .matmul(&self.patch_embed.view([e, -1]).tr());
        let (mut cos, mut sin) = self.rotary(&layout.positions, device);
        let unit = c.spatial_merge_size * c.spatial_merge_size;
        let permute = |t: &Tensor, index: &Tensor| {
            let s = t.size();
            t.view([s[0] / unit, unit, -1])
                .index_select(0, index)
                .view([s[0], -1])
        };
        let window_index = (!layout.window_index.is_empty())
            .then(|| Tensor::from_slice(&layout.window_index).to_device(device));
        if let Some(index) = &window_index {
            x = permute(&x, index);
            cos = permute(&cos, index);
            sin = permute(&sin, index);
        }
        let checkpointing = self.gradient_checkpointing && grad_enabled();
        for (i, block) in self.blocks.iter().enumerate() {
            let segments = if self.variant == Variant::Qwen25Vl
                && !c.fullatt_block_indexes.contains(&(i as i64))
            {
                &layout.window_segments
            } else {
                &layout.frame_segments
            };
            x = if checkpointing && (x.requires_grad() || block.has_trainable()) {
                let (block, config) = (block.shallow_clone(), c.clone());
                let (cos, sin) = (cos.shallow_clone(), sin.shallow_clone());
                let segments = segments.clone();
                checkpoint(&[&x], move |xs| {
                    block_forward(&config, &block, &xs[0], &cos, &sin, &segments)
                })
            } else {
                block_forward(c, block, &x, &cos, &sin, segments)
            };
        }
        let merged = self.ln_q.forward(&x).view([-1, e * unit]);
        let mut out = self
            .merger_fc2
            .forward(&self.merger_fc1.forward(&merged).gelu("none"));
        if let Some(index) = &window_index {
            out = out.index_select(0, &index.argsort(0, false));
        }
        out
    }

    fn rotary(&self, positions: &[[i64; 2]], device: Device) -> (Tensor, Tensor) {
        let head_dim = self.config.embed_dim / self.config.num_heads;
        rotary_tables(positions, head_dim, self.config.rope_theta, device)
    }
}

/// One vision block; a free function so a checkpoint closure can own what it needs.
fn block_forward(
    c: &VisionConfig,
    b: &Block,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    segments: &[i64],
) -> Tensor {
    let attn = segment_attention(
        &b.qkv,
        &b.proj,
        &b.norm1.forward(x),
        c.num_heads,
        cos,
        sin,
        segments,
    );
    let x = x + attn;
    let h = b.norm2.forward(&x);
    let mlp = match &b.mlp {
        Mlp::Plain { fc1, fc2 } => fc2.forward(&activation(&c.hidden_act, &fc1.forward(&h))),
        Mlp::Gated {
            gate_proj,
            up_proj,
            down_proj,
        } => down_proj
            .forward(&(activation(&c.hidden_act, &gate_proj.forward(&h)) * up_proj.forward(&h))),
    };
    x + mlp
}
