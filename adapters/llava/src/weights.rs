//! Loading LLaVA checkpoints whose tensor names come in several layouts: the llava-hf Hub
//! one (`language_model.model.*`, `language_model.lm_head.weight`,
//! `vision_tower.vision_model.*`), what `transformers` 5 `save_pretrained` writes
//! (`vision_tower.*` without `vision_model`), and the runtime module paths
//! (`model.language_model.*`, `model.vision_tower.*`, `lm_head.weight`). Every name is mapped
//! to the Hub layout the model's variables use, then copied from the memory-mapped shard.
//!
//! Loading itself is the core's [`load_into_renamed`] with [`canonical_name`] as the hook.

use std::borrow::Cow;
use std::path::Path;

use anyhow::Result;
use lmms_ft_core::weights::{load_into_renamed, LoadOptions};
use tch::nn::VarStore;

/// Maps any accepted checkpoint name to the Hub layout.
pub fn canonical_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("model.language_model.") {
        return format!("language_model.model.{rest}");
    }
    if name == "lm_head.weight" {
        return "language_model.lm_head.weight".into();
    }
    let vision = name
        .strip_prefix("model.vision_tower.")
        .or_else(|| name.strip_prefix("vision_tower."));
    if let Some(rest) = vision {
        let rest = rest.strip_prefix("vision_model.").unwrap_or(rest);
        return format!("vision_tower.vision_model.{rest}");
    }
    if let Some(rest) = name.strip_prefix("model.") {
        if rest.starts_with("multi_modal_projector.") || rest == "image_newline" {
            return rest.to_string();
        }
    }
    name.to_string()
}

/// Copies every checkpoint tensor of `dir` into the variable its canonical name denotes.
/// Missing, unexpected (unless `ignore` says so, by canonical name), duplicated or
/// mis-shaped tensors are errors that name the tensor and the file.
pub fn load_llava(vs: &VarStore, dir: &Path, ignore: &dyn Fn(&str) -> bool) -> Result<()> {
    load_into_renamed(
        vs,
        dir,
        &LoadOptions {
            ignore_unexpected: ignore,
        },
        &|name| Cow::Owned(canonical_name(name)),
    )
}

#[cfg(test)]
mod tests {
    use super::canonical_name;

    /// The llava-hf Hub names, transformers 5's `save_pretrained` names and its runtime
    /// module paths all land on the same variable.
    #[test]
    fn every_layout_maps_to_the_hub_names() {
        let cases = [
            (
                "language_model.model.layers.0.mlp.up_proj.weight",
                "language_model.model.layers.0.mlp.up_proj.weight",
            ),
            (
                "model.language_model.layers.0.mlp.up_proj.weight",
                "language_model.model.layers.0.mlp.up_proj.weight",
            ),
            (
                "language_model.lm_head.weight",
                "language_model.lm_head.weight",
            ),
            ("lm_head.weight", "language_model.lm_head.weight"),
            (
                "vision_tower.vision_model.pre_layrnorm.bias",
                "vision_tower.vision_model.pre_layrnorm.bias",
            ),
            (
                "vision_tower.pre_layrnorm.bias",
                "vision_tower.vision_model.pre_layrnorm.bias",
            ),
            (
                "model.vision_tower.encoder.layers.1.mlp.fc1.weight",
                "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
            ),
            (
                "model.multi_modal_projector.linear_1.weight",
                "multi_modal_projector.linear_1.weight",
            ),
            (
                "multi_modal_projector.linear_2.bias",
                "multi_modal_projector.linear_2.bias",
            ),
            ("model.image_newline", "image_newline"),
            ("image_newline", "image_newline"),
        ];
        for (name, expected) in cases {
            assert_eq!(canonical_name(name), expected, "{name}");
        }
    }
}
