//! The typed bundle the core drives: Qwen2-VL / Qwen2.5-VL config, processor, Hub chat
//! template, collator and model.

use std::path::Path;

use anyhow::Result;
pub use lmms_ft_backbones::qwen_vl::batch::{QwenCollator, Sample};
use lmms_ft_core::data::template::{ContentMode, HfChatTemplate, MediaPlaceholders};
use lmms_ft_core::family::{Family, ProcessorOptions};
use tch::{Device, Kind};

use crate::config::{Qwen2VlConfig, Variant};
use crate::model::Qwen2VlModel;
use crate::processor::QwenProcessor;
use crate::rope::RopeSpec;

pub const IMAGE_PLACEHOLDER: &str = "<|image_pad|>";
pub const VIDEO_PLACEHOLDER: &str = "<|video_pad|>";

/// The shared Qwen-VL collator, set up for this config.
pub fn collator(config: &Qwen2VlConfig) -> QwenCollator {
    let v = &config.vision;
    QwenCollator::new(
        RopeSpec {
            image_token_id: config.image_token_id,
            video_token_id: config.video_token_id,
            spatial_merge_size: v.spatial_merge_size,
            tokens_per_second: (config.variant == Variant::Qwen25Vl).then_some(v.tokens_per_second),
        },
        v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size,
    )
}

/// Qwen2-VL and Qwen2.5-VL share every piece; the variant comes from `config.json`.
pub struct Qwen2Vl;

impl Family for Qwen2Vl {
    type Config = Qwen2VlConfig;
    type Processor = QwenProcessor;
    type Template = HfChatTemplate;
    type Collator = QwenCollator;
    type Model = Qwen2VlModel;

    fn processor(
        _config: &Qwen2VlConfig,
        dir: &Path,
        opts: &ProcessorOptions,
    ) -> Result<QwenProcessor> {
        Ok(QwenProcessor::from_dir(dir)?.with_options(opts))
    }

    fn template(_config: &Qwen2VlConfig, dir: &Path) -> Result<HfChatTemplate> {
        HfChatTemplate::from_dir(
            dir,
            MediaPlaceholders::new(IMAGE_PLACEHOLDER, Some(VIDEO_PLACEHOLDER)),
            ContentMode::Parts,
        )
    }

    fn collator(config: &Qwen2VlConfig) -> QwenCollator {
        collator(config)
    }

    fn load(
        config: &Qwen2VlConfig,
        dir: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<Qwen2VlModel> {
        Qwen2VlModel::load(config, dir, device, kind)
    }
}
