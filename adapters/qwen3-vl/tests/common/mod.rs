//! The tiny Qwen3-VL checkpoint of `scripts/oracle/qwen3_vl_fixture.py`, made once (cached
//! across test binaries and runs), with its reference tensors, its samples as model batches,
//! and its raw media and conversations for the data path.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use lmms_ft_core::data::media::{load_image, ImageLimits};
use lmms_ft_core::data::{Conversation, DecodedMedia, RgbImage, VideoClip};
use lmms_ft_core::family::HfConfig;
use lmms_ft_core::loss::LossTargets;
use lmms_ft_core::testing::{cached_fixture, conversation_from_messages};
use lmms_ft_qwen3_vl::config::Qwen3VlConfig;
use lmms_ft_qwen3_vl::model::{Batch, Media};
use tch::Tensor;

/// The single samples, then the right-padded batch of two (`two_images`, `video`).
pub const SAMPLES: [&str; 4] = ["text", "image", "two_images", "video"];

pub struct Fixture {
    pub dir: PathBuf,
    pub config: Qwen3VlConfig,
    /// What the oracle printed: the parameter count on the meta device.
    pub printed: String,
    pub reference: HashMap<String, Tensor>,
    pub meta: serde_json::Value,
}

// Tensors are only read after construction; tests share them across threads.
unsafe impl Sync for Fixture {}
unsafe impl Send for Fixture {}

pub fn grids(t: Option<&Tensor>) -> Vec<[i64; 3]> {
    let Some(t) = t else { return vec![] };
    let v: Vec<i64> = Vec::try_from(t.flatten(0, -1)).unwrap();
    v.chunks(3).map(|c| [c[0], c[1], c[2]]).collect()
}

pub fn fixture() -> &'static Fixture {
    static FX: OnceLock<Fixture> = OnceLock::new();
    FX.get_or_init(|| {
        let (dir, printed) = cached_fixture("qwen3_vl_fixture.py", "qwen3_vl");
        let read = |name: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
        };
        let config = Qwen3VlConfig::from_hf_json(&read("config.json")).unwrap();
        let reference = Tensor::read_safetensors(dir.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
        Fixture {
            meta: read("reference.json"),
            dir,
            config,
            printed,
            reference,
        }
    })
}

impl Fixture {
    pub fn get(&self, name: &str, key: &str) -> Option<&Tensor> {
        self.reference.get(&format!("{name}.{key}"))
    }

    /// The oracle's processed inputs of `name` (a sample or `batch`) as a model batch, with
    /// `transformers`' position ids and its labels.
    pub fn batch(&self, name: &str) -> Batch {
        let get = |k: &str| self.get(name, k);
        let media = |p: Option<&Tensor>, g: Vec<[i64; 3]>| {
            p.map(|p| Media {
                pixels: p.shallow_clone(),
                grids: g,
            })
        };
        Batch {
            input_ids: get("input_ids").unwrap().shallow_clone(),
            targets: Some(LossTargets::from_labels(get("labels").unwrap()).unwrap()),
            position_ids: get("position_ids").unwrap().shallow_clone(),
            images: media(get("pixel_values"), grids(get("image_grid_thw"))),
            videos: media(get("pixel_values_videos"), grids(get("video_grid_thw"))),
            attention_mask: None,
        }
    }

    pub fn conversation(&self, name: &str) -> Conversation {
        conversation_from_messages(&self.meta["samples"][name]["messages"])
    }

    /// The decoded media of a single sample, as the data pipeline would hand them over.
    pub fn media(&self, name: &str) -> DecodedMedia {
        let limits = ImageLimits::default();
        let image = |f: &str| load_image(&self.dir.join(f), &limits).unwrap();
        let mut media = DecodedMedia::default();
        match name {
            "image" => media.images.push(image("image_a.png")),
            "two_images" => media
                .images
                .extend([image("image_a.png"), image("image_b.png")]),
            "video" => media.videos.push(self.video()),
            _ => {}
        }
        media
    }

    /// Four 64 × 64 frames, sampled at the fixture's fps.
    pub fn video(&self) -> VideoClip {
        let raw = std::fs::read(self.dir.join("video.rgb")).unwrap();
        let frames: Vec<RgbImage> = raw
            .chunks(64 * 64 * 3)
            .map(|c| RgbImage::from_raw(64, 64, c.to_vec()).unwrap())
            .collect();
        VideoClip {
            frames,
            sampled_fps: self.meta["video_fps"].as_f64().unwrap(),
        }
    }
}
