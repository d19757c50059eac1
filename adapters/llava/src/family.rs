//! The typed bundle the core drives for `llava` (1.5, Interleave), `llava_next`,
//! `llava_next_video` and `llava_onevision` checkpoints: config, image / video processor,
//! chat template, collator and model.
//!
//! # Templates
//!
//! The directory's Hub template is used with `<image>` as the placeholder, except for the
//! Vicuna-style checkpoints (llava-1.5, llava-1.6-vicuna: a Llama text model whose Hub
//! template writes `USER: … ASSISTANT: …`). Their Hub template ends an answer with a space
//! and no end-of-turn token, so a model trained on it never learns to stop (lmms-finetune
//! works around this by labeling the very last token as a stop). They get
//! [`VICUNA_TRAINING_TEMPLATE`] instead: the same text, but each answer ends with `</s>`
//! (which the label rule then labels), as in the original LLaVA's `conv_vicuna_v1`. Its
//! generation prompt (`ASSISTANT:`) equals the Hub one, so inference prompts do not change.
//!
//! # BOS
//!
//! The Hub templates do not write `<s>`, but `transformers`' processors tokenise with the
//! tokenizer's special tokens, so Llama / Mistral checkpoints always saw a leading BOS (the
//! original LLaVA too). [`LlavaTemplate`] prepends whatever the tokenizer's post-processor
//! puts before a text (nothing for Qwen2), unlabeled, unless the template wrote it already.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use lmms_ft_backbones::text_config::TextModelType;
use lmms_ft_core::data::template::{
    discover_template, ContentMode, HfChatTemplate, MediaPlaceholders,
};
use lmms_ft_core::data::Conversation;
use lmms_ft_core::family::{
    ChatTemplate, Collator, EncodedText, Family, MediaTokens, Placement, ProcessorOptions,
    TextBatch, IGNORE_INDEX,
};
use tch::{Device, Kind, Tensor};

use crate::config::LlavaConfig;
use crate::model::{Batch, LlavaModel, PackedLayout};
use crate::processor::{LlavaMedia, LlavaProcessor};

pub const IMAGE_PLACEHOLDER: &str = "<image>";
/// What NeXT-Video's and OneVision's templates write for a video.
pub const VIDEO_PLACEHOLDER: &str = "<video>";

/// Training template of the Vicuna-style checkpoints (see the module doc).
pub const VICUNA_TRAINING_TEMPLATE: &str = include_str!("vicuna_training.jinja");

/// Whether a checkpoint is Vicuna-style: Llama text and a Hub template in the
/// `USER: / ASSISTANT:` format that writes no end-of-turn token.
pub fn is_vicuna_style(config: &LlavaConfig, hub_template: &str) -> bool {
    config.text.model_type == TextModelType::Llama
        && hub_template.contains("ASSISTANT:")
        && !hub_template.contains("</s>")
        && !hub_template.contains("eos_token")
}

/// A Hub (or training) template plus the tokenizer's leading special tokens.
pub struct LlavaTemplate {
    inner: HfChatTemplate,
    prefix: Vec<i64>,
    /// Whether the Vicuna training template replaced the Hub one.
    pub training_template: bool,
}

impl LlavaTemplate {
    pub fn from_dir(config: &LlavaConfig, dir: &Path) -> Result<LlavaTemplate> {
        let video = config.video_token_id.map(|_| VIDEO_PLACEHOLDER);
        let placeholders = MediaPlaceholders::new(IMAGE_PLACEHOLDER, video);
        let hub = discover_template(dir)?;
        let training_template = is_vicuna_style(config, &hub.source);
        let inner = if training_template {
            HfChatTemplate::with_training_template(
                dir,
                VICUNA_TRAINING_TEMPLATE,
                placeholders,
                ContentMode::Parts,
            )?
        } else {
            HfChatTemplate::from_dir(dir, placeholders, ContentMode::Parts)?
        };
        let tok = inner.tokenizer();
        let encode = |special: bool| {
            tok.encode("a", special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| anyhow!("probing the tokenizer's special tokens: {e}"))
        };
        let (with, without) = (encode(true)?, encode(false)?);
        let prefix = match with.windows(without.len()).position(|w| w == without) {
            Some(at) => with[..at].iter().map(|&i| i as i64).collect(),
            None => bail!("the tokenizer's post-processor changes the text's own tokens"),
        };
        Ok(LlavaTemplate {
            inner,
            prefix,
            training_template,
        })
    }

    pub fn inner(&self) -> &HfChatTemplate {
        &self.inner
    }

    fn with_prefix(&self, mut ids: Vec<i64>, labels: Option<&mut Vec<i64>>) -> Vec<i64> {
        if self.prefix.is_empty() || ids.starts_with(&self.prefix) {
            return ids;
        }
        if let Some(labels) = labels {
            labels.splice(0..0, std::iter::repeat_n(IGNORE_INDEX, self.prefix.len()));
        }
        ids.splice(0..0, self.prefix.iter().copied());
        ids
    }
}

impl ChatTemplate for LlavaTemplate {
    fn encode(
        &self,
        conv: &Conversation,
        media: &MediaTokens,
        label_all: bool,
    ) -> Result<EncodedText> {
        let mut text = self.inner.encode(conv, media, label_all)?;
        let ids = std::mem::take(&mut text.input_ids);
        text.input_ids = self.with_prefix(ids, Some(&mut text.labels));
        Ok(text)
    }

    fn encode_prompt(&self, conv: &Conversation, media: &MediaTokens) -> Result<Vec<i64>> {
        Ok(self.with_prefix(self.inner.encode_prompt(conv, media)?, None))
    }

    fn decode(&self, ids: &[i64]) -> Result<String> {
        self.inner.decode(ids)
    }

    /// The training template's end-of-turn (`</s>` for the Vicuna-style checkpoints) and the
    /// tokenizer's end-of-sequence token.
    fn stop_token_ids(&self) -> Vec<i64> {
        self.inner.stop_token_ids()
    }
}

/// One encoded sample.
pub type Sample = lmms_ft_core::family::Sample<LlavaMedia>;

pub struct LlavaCollator {
    tile: i64,
    pad_id: i64,
    /// `<image>` and `<video>` ids, whose placeholders the collator counts.
    media_ids: [Option<i64>; 2],
}

impl LlavaCollator {
    pub fn new(config: &LlavaConfig) -> Self {
        LlavaCollator {
            tile: config.vision.image_size(),
            pad_id: if config.image_token_id == 0 { 1 } else { 0 },
            media_ids: [Some(config.image_token_id), config.video_token_id],
        }
    }
}

impl Collator for LlavaCollator {
    type Media = LlavaMedia;
    type Batch = Batch;

    /// Any id but the image token's.
    fn pad_id(&self) -> i64 {
        self.pad_id
    }

    fn packs(&self) -> bool {
        true
    }

    /// The collated text and every sample's media, concatenated in sample order (the order
    /// of their placeholder tokens).
    fn assemble(
        &self,
        text: TextBatch,
        samples: Vec<Sample>,
        _placements: &[Placement],
        device: Device,
    ) -> Result<Batch> {
        let mut pixels = Vec::new();
        let mut image_sizes = Vec::new();
        let mut image_anyres = Vec::new();
        let mut video_pixels = Vec::new();
        let mut video_frames = Vec::new();
        let mut tiles = 0;
        let mut media_tokens = [0i64; 2];
        for s in samples {
            for (count, id) in media_tokens.iter_mut().zip(self.media_ids) {
                *count += s.text.input_ids.iter().filter(|&&t| Some(t) == id).count() as i64;
            }
            pixels.extend(s.media.pixels);
            image_sizes.extend(s.media.image_sizes);
            image_anyres.extend(s.media.image_anyres);
            video_pixels.extend(s.media.video_pixels);
            video_frames.extend(s.media.video_frames);
            tiles += s.media.num_tiles;
        }
        let stack = |values: &[f32], n: i64| {
            (n > 0).then(|| {
                Tensor::from_slice(values)
                    .view([n, 3, self.tile, self.tile])
                    .to_device(device)
            })
        };
        let pixel_values = stack(&pixels, tiles as i64);
        let pixel_values_videos = stack(&video_pixels, video_frames.iter().sum());
        Ok(Batch {
            input_ids: text.input_ids,
            targets: text.targets,
            pixel_values,
            image_sizes,
            image_anyres,
            pixel_values_videos,
            video_frames,
            media_tokens,
            packing: text.packed.map(|p| PackedLayout {
                position_ids: p.position_ids,
                attention_mask: p.attention_mask,
            }),
        })
    }
}

/// LLaVA-1.5, Interleave, LLaVA-NeXT, NeXT-Video and OneVision share every piece; the
/// architecture comes from `config.json`.
pub struct Llava;

impl Family for Llava {
    type Config = LlavaConfig;
    type Processor = LlavaProcessor;
    type Template = LlavaTemplate;
    type Collator = LlavaCollator;
    type Model = LlavaModel;

    /// Pixel budgets do not apply: LLaVA tiles have the tower's fixed size, so a budget the
    /// user set would be silently ignored; it is refused instead.
    fn processor(
        config: &LlavaConfig,
        dir: &Path,
        opts: &ProcessorOptions,
    ) -> Result<LlavaProcessor> {
        if *opts != ProcessorOptions::default() {
            bail!("data.min_pixels / max_pixels / video_min_pixels / video_max_pixels do not apply to LLaVA, whose images become fixed-size tiles; remove them");
        }
        LlavaProcessor::from_dir(config, dir)
    }

    fn template(config: &LlavaConfig, dir: &Path) -> Result<LlavaTemplate> {
        LlavaTemplate::from_dir(config, dir)
    }

    fn collator(config: &LlavaConfig) -> LlavaCollator {
        LlavaCollator::new(config)
    }

    fn load(config: &LlavaConfig, dir: &Path, device: Device, kind: Kind) -> Result<LlavaModel> {
        if lmms_ft_core::compose::is_skeleton(dir) {
            return crate::compose::load(config, dir, device, kind);
        }
        LlavaModel::load(config, dir, device, kind)
    }
}
