//! What the LLaVA tests share: a fixture written by `scripts/oracle/llava_fixture.py`, and its
//! reference samples as model batches built from transformers' own processor outputs.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lmms_ft_core::data::{RgbImage, VideoClip};
use lmms_ft_core::family::HfConfig;
use lmms_ft_core::loss::LossTargets;
use lmms_ft_core::testing::cached_fixture;
use lmms_ft_llava::config::LlavaConfig;
use lmms_ft_llava::model::Batch;
use tch::Tensor;

pub struct Fixture {
    pub path: PathBuf,
    /// The oracle's last printed line (parameter count, tensor names).
    pub printed: serde_json::Value,
    pub config: LlavaConfig,
    pub reference: HashMap<String, Tensor>,
    pub meta: serde_json::Value,
}

/// Writes the fixture `variant` into a temp dir and reads it back.
pub fn fixture(variant: &str) -> Fixture {
    let (path, printed) = cached_fixture("llava_fixture.py", variant);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path.join("config.json")).unwrap()).unwrap();
    let config = LlavaConfig::from_hf_json(&json).unwrap();
    let reference = Tensor::read_safetensors(path.join("reference.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let meta = serde_json::from_str(&std::fs::read_to_string(path.join("reference.json")).unwrap())
        .unwrap();
    Fixture {
        path,
        printed: serde_json::from_str(printed.lines().last().unwrap()).unwrap(),
        config,
        reference,
        meta,
    }
}

/// The fixture's four frames of 56 × 70 RGB8.
pub fn fixture_video(dir: &Path) -> VideoClip {
    let raw = std::fs::read(dir.join("video.rgb")).unwrap();
    let frames = raw
        .chunks(56 * 70 * 3)
        .map(|c| RgbImage::from_raw(56, 70, c.to_vec()).unwrap())
        .collect::<Vec<_>>();
    assert_eq!(frames.len(), 4);
    VideoClip {
        frames,
        sampled_fps: 1.0,
    }
}

pub fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_i64().unwrap()).collect())
        .unwrap_or_default()
}

impl Fixture {
    /// The samples the fixture holds, in order (`video` only for the video variants).
    pub fn sample_names(&self) -> Vec<String> {
        ["text", "image", "two_images", "video"]
            .into_iter()
            .filter(|n| self.meta["samples"].get(n).is_some())
            .map(str::to_string)
            .collect()
    }

    pub fn get(&self, name: &str, key: &str) -> Option<&Tensor> {
        self.reference.get(&format!("{name}.{key}"))
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// `<image>` and `<video>` tokens in sample `name`'s input ids.
    pub fn media_tokens(&self, name: &str) -> [i64; 2] {
        let ids: Vec<i64> =
            Vec::try_from(self.get(name, "input_ids").unwrap().flatten(0, -1)).unwrap();
        let count = |id: Option<i64>| ids.iter().filter(|&&t| Some(t) == id).count() as i64;
        [
            count(Some(self.config.image_token_id)),
            count(self.config.video_token_id),
        ]
    }

    /// Sample `name` as transformers' processor made it, labels on every non-media token.
    pub fn batch(&self, name: &str) -> Batch {
        let sample = &self.meta["samples"][name];
        let image_sizes: Vec<[i64; 2]> = sample["image_sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| [s[0].as_i64().unwrap(), s[1].as_i64().unwrap()])
            .collect();
        // OneVision tiles an image only when it is its sample's only one.
        let image_anyres = match self.get(name, "batch_num_images") {
            Some(n) => {
                let n: Vec<i64> = Vec::try_from(n.flatten(0, -1)).unwrap();
                n.iter().flat_map(|&k| vec![k == 1; k as usize]).collect()
            }
            None => vec![],
        };
        let labels = self.get(name, "labels").unwrap();
        Batch {
            input_ids: self.get(name, "input_ids").unwrap().shallow_clone(),
            targets: Some(LossTargets::from_labels(labels).unwrap()),
            pixel_values: self.get(name, "pixel_values").map(Tensor::shallow_clone),
            image_sizes,
            image_anyres,
            pixel_values_videos: self
                .get(name, "pixel_values_videos")
                .map(Tensor::shallow_clone),
            video_frames: ints(&sample["video_frames"]),
            media_tokens: self.media_tokens(name),
            packing: None,
        }
    }
}
