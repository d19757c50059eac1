//! The typed bundle the core drives: config, tiling processor, the Hub chat template, the
//! collator (which builds `cross_attention_mask` from the `<|image|>` positions as
//! `MllamaProcessor` does) and the model.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use lmms_ft_core::data::template::{
    discover_template, load_dir_tokenizer, ChatRenderer, ContentMode, HfChatTemplate,
    MediaPlaceholders, SpecialTokens,
};
use lmms_ft_core::data::Conversation;
use lmms_ft_core::family::{
    ChatTemplate, Collator, EncodedText, Family, MediaTokens, Placement, ProcessorOptions,
    TextBatch, IGNORE_INDEX,
};
use tch::{Device, Kind, Tensor};

use crate::config::MllamaConfig;
use crate::model::{Batch, Images, MllamaModel};
use crate::processor::{MllamaMedia, MllamaProcessor};

pub const IMAGE_TOKEN: &str = "<|image|>";

/// The date the Hub template writes when none is given. transformers passes today's date
/// (`strftime_now`), which would make the same data tokenise differently from day to day;
/// training and inference here use the template's own fixed default instead.
pub const DATE_STRING: &str = "26 Jul 2024";

/// One encoded sample.
pub type Sample = lmms_ft_core::family::Sample<MllamaMedia>;

/// `get_cross_attention_token_mask`: for each image, the `[start, end)` token range that
/// attends to it. An image attends from its token up to the next image token (or the end);
/// consecutive image tokens attend together to what follows the last of them.
pub fn cross_attention_ranges(ids: &[i64], image_token: i64) -> Vec<(usize, usize)> {
    let locs: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == image_token)
        .map(|(i, _)| i)
        .collect();
    if locs.is_empty() {
        return Vec::new();
    }
    let mut ranges: Vec<(usize, usize)> = locs
        .windows(2)
        .map(|w| (w[0], w[1]))
        .chain(std::iter::once((locs[locs.len() - 1], ids.len())))
        .collect();
    let mut last_end = ranges[ranges.len() - 1].1;
    for r in ranges.iter_mut().rev() {
        if r.0 + 1 == r.1 {
            r.1 = last_end;
        }
        last_end = r.1;
    }
    ranges
}

/// The Hub chat template with the label rule cut at `<|eot_id|>`: the shared rule labels
/// every special token right after an assistant reply, which in Llama-3's format runs on
/// into the next turn's `<|start_header_id|>`; a reply ends at its `<|eot_id|>`.
pub struct MllamaTemplate {
    inner: HfChatTemplate,
    eot: i64,
    specials: std::collections::HashSet<i64>,
}

impl MllamaTemplate {
    pub fn new(inner: HfChatTemplate) -> Result<Self> {
        let tok = inner.tokenizer();
        let eot = tok
            .token_to_id("<|eot_id|>")
            .context("the tokenizer has no <|eot_id|> token")? as i64;
        let specials = tok
            .get_added_tokens_decoder()
            .into_keys()
            .map(i64::from)
            .collect();
        Ok(MllamaTemplate {
            inner,
            eot,
            specials,
        })
    }

    pub fn inner(&self) -> &HfChatTemplate {
        &self.inner
    }
}

impl ChatTemplate for MllamaTemplate {
    fn is_media_token(&self, id: i64) -> bool {
        self.inner.is_media_token(id)
    }

    fn encode(
        &self,
        conv: &Conversation,
        media: &MediaTokens,
        label_all: bool,
    ) -> Result<EncodedText> {
        let mut enc = self.inner.encode(conv, media, label_all)?;
        if !label_all {
            let n = enc.labels.len();
            for i in 0..n {
                if enc.labels[i] != self.eot {
                    continue;
                }
                let mut j = i + 1;
                while j < n
                    && enc.labels[j] != IGNORE_INDEX
                    && self.specials.contains(&enc.input_ids[j])
                {
                    enc.labels[j] = IGNORE_INDEX;
                    j += 1;
                }
            }
        }
        Ok(enc)
    }

    fn encode_prompt(&self, conv: &Conversation, media: &MediaTokens) -> Result<Vec<i64>> {
        self.inner.encode_prompt(conv, media)
    }

    fn decode(&self, ids: &[i64]) -> Result<String> {
        self.inner.decode(ids)
    }

    fn stop_token_ids(&self) -> Vec<i64> {
        self.inner.stop_token_ids()
    }
}

pub struct MllamaCollator {
    image_token_id: i64,
    max_tiles: i64,
    channels: i64,
    size: i64,
    pad_id: i64,
}

impl MllamaCollator {
    pub fn new(config: &MllamaConfig) -> Self {
        MllamaCollator {
            image_token_id: config.image_token_id,
            max_tiles: config.vision.max_num_tiles,
            channels: config.vision.num_channels,
            size: config.vision.image_size,
            pad_id: config.text.pad_token_id.unwrap_or(0),
        }
    }

    /// The image tensors of a batch padded to `len` tokens, `None` when no sample has images.
    pub fn images(&self, samples: &[Sample], len: usize, device: Device) -> Result<Option<Images>> {
        let n = samples
            .iter()
            .map(|s| s.media.images.len())
            .max()
            .unwrap_or(0);
        if n == 0 {
            return Ok(None);
        }
        let (b, tiles) = (samples.len(), self.max_tiles as usize);
        let tile_len = (self.channels * self.size * self.size) as usize;
        let mut pixels = vec![0f32; b * n * tiles * tile_len];
        let mut ids = vec![0i64; b * n];
        // transformers marks the first tile of every image slot, padding images included.
        let mut ar_mask = vec![0i64; b * n * tiles];
        let mut cam = vec![0i64; b * len * n * tiles];
        for (row, s) in samples.iter().enumerate() {
            let found = s
                .text
                .input_ids
                .iter()
                .filter(|&&t| t == self.image_token_id)
                .count();
            if found != s.media.images.len() {
                bail!(
                    "batch sample {row}: {found} {IMAGE_TOKEN} token(s) for {} image(s)",
                    s.media.images.len()
                );
            }
            for j in 0..n {
                ar_mask[(row * n + j) * tiles] = 1;
            }
            for (j, img) in s.media.images.iter().enumerate() {
                let t = img.num_tiles() as usize;
                ensure!(
                    t <= tiles && img.pixels.len() == t * tile_len,
                    "batch sample {row}, image {j}: {t} tiles do not fit {tiles} tiles of {} pixels",
                    self.size
                );
                let at = (row * n + j) * tiles * tile_len;
                pixels[at..at + img.pixels.len()].copy_from_slice(&img.pixels);
                ids[row * n + j] = img.aspect_ratio_id;
                for k in 0..t {
                    ar_mask[(row * n + j) * tiles + k] = 1;
                }
            }
            let ranges = cross_attention_ranges(&s.text.input_ids, self.image_token_id);
            for (j, (&(start, end), img)) in ranges.iter().zip(&s.media.images).enumerate() {
                // A sample's last range ends at its own length; the padding after it is
                // never attended by a real token, so it keeps the last row's mask.
                let end = if end == s.text.input_ids.len() {
                    len
                } else {
                    end.min(len)
                };
                for pos in start..end {
                    let base = ((row * len + pos) * n + j) * tiles;
                    for k in 0..img.num_tiles() as usize {
                        cam[base + k] = 1;
                    }
                }
            }
        }
        let (b, n, tiles, len) = (b as i64, n as i64, tiles as i64, len as i64);
        Ok(Some(Images {
            pixels: Tensor::from_slice(&pixels)
                .view([b, n, tiles, self.channels, self.size, self.size])
                .to_device(device),
            aspect_ratio_ids: Tensor::from_slice(&ids).view([b, n]).to_device(device),
            aspect_ratio_mask: Tensor::from_slice(&ar_mask)
                .view([b, n, tiles])
                .to_device(device),
            cross_attention_mask: Tensor::from_slice(&cam)
                .view([b, len, n, tiles])
                .to_device(device),
        }))
    }
}

impl Collator for MllamaCollator {
    type Media = MllamaMedia;
    type Batch = Batch;

    fn pad_id(&self) -> i64 {
        self.pad_id
    }

    fn assemble(
        &self,
        text: TextBatch,
        samples: Vec<Sample>,
        _placements: &[Placement],
        device: Device,
    ) -> Result<Batch> {
        let (b, t) = text.input_ids.size2()?;
        let images = self.images(&samples, t as usize, device)?;
        let position_ids = Tensor::arange(t, (Kind::Int64, Device::Cpu))
            .unsqueeze(0)
            .expand([b, t], false)
            .contiguous()
            .to_device(device);
        Ok(Batch {
            input_ids: text.input_ids,
            targets: text.targets,
            position_ids,
            images,
        })
    }
}

pub struct Mllama;

impl Family for Mllama {
    type Config = MllamaConfig;
    type Processor = MllamaProcessor;
    type Template = MllamaTemplate;
    type Collator = MllamaCollator;
    type Model = MllamaModel;

    fn processor(
        _config: &MllamaConfig,
        dir: &Path,
        _opts: &ProcessorOptions,
    ) -> Result<MllamaProcessor> {
        MllamaProcessor::from_dir(dir)
    }

    fn template(_config: &MllamaConfig, dir: &Path) -> Result<MllamaTemplate> {
        // The template reads `date_string` as a variable, which the special-token variables
        // carry to it.
        let mut special = SpecialTokens::from_dir(dir)?;
        special.set("date_string", DATE_STRING.into());
        let renderer = ChatRenderer::new(discover_template(dir)?, special, ContentMode::Parts)?;
        MllamaTemplate::new(HfChatTemplate::new(
            renderer,
            load_dir_tokenizer(dir)?,
            MediaPlaceholders::new(IMAGE_TOKEN, None),
        )?)
    }

    fn collator(config: &MllamaConfig) -> MllamaCollator {
        MllamaCollator::new(config)
    }

    fn load(config: &MllamaConfig, dir: &Path, device: Device, kind: Kind) -> Result<MllamaModel> {
        MllamaModel::load(config, dir, device, kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_transformers() {
        // No image: nothing attends.
        assert!(cross_attention_ranges(&[1, 2, 3], 9).is_empty());
        // One image: from its token to the end.
        assert_eq!(cross_attention_ranges(&[1, 9, 2, 3], 9), vec![(1, 4)]);
        // Two images apart: each up to the next.
        assert_eq!(
            cross_attention_ranges(&[9, 1, 9, 2], 9),
            vec![(0, 2), (2, 4)]
        );
        // Two consecutive images: both to the end.
        assert_eq!(
            cross_attention_ranges(&[1, 9, 9, 2], 9),
            vec![(1, 4), (2, 4)]
        );
    }
}
