//! The tiny Qwen2-VL checkpoint of `scripts/oracle/qwen2_vl_fixture.py`, made once (cached across test binaries and runs)
//!, with its four reference samples turned into model batches.

use std::path::PathBuf;
use std::sync::OnceLock;

use lmms_ft_core::family::HfConfig;
use lmms_ft_core::loss::LossTargets;
use lmms_ft_core::testing::cached_fixture;
use lmms_ft_qwen2_vl::config::Qwen2VlConfig;
use lmms_ft_qwen2_vl::model::{Batch, Media};
use tch::Tensor;

pub struct Fixture {
    pub dir: PathBuf,
    pub config: Qwen2VlConfig,
    /// text, one image, two images, video.
    pub batches: Vec<Batch>,
}

// Tensors are only read after construction; tests share them across threads.
unsafe impl Sync for Fixture {}
unsafe impl Send for Fixture {}

fn grids(t: Option<&Tensor>) -> Vec<[i64; 3]> {
    let Some(t) = t else { return vec![] };
    let v: Vec<i64> = Vec::try_from(t.flatten(0, -1)).unwrap();
    v.chunks(3).map(|c| [c[0], c[1], c[2]]).collect()
}

pub fn fixture() -> &'static Fixture {
    static FX: OnceLock<Fixture> = OnceLock::new();
    FX.get_or_init(|| load(cached_fixture("qwen2_vl_fixture.py", "qwen2_vl").0))
}

/// A fixture directory another process already made.
pub fn load(dir: PathBuf) -> Fixture {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let config = Qwen2VlConfig::from_hf_json(&json).unwrap();
    let reference: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let batches = ["text", "image", "two_images", "video"]
        .iter()
        .map(|name| {
            let get = |k: &str| reference.get(&format!("{name}.{k}"));
            let labels = get("labels").unwrap();
            let media = |p: Option<&Tensor>, g: Vec<[i64; 3]>| {
                p.map(|p| Media {
                    pixels: p.shallow_clone(),
                    grids: g,
                })
            };
            Batch {
                input_ids: get("input_ids").unwrap().shallow_clone(),
                targets: Some(LossTargets::from_labels(labels).unwrap()),
                position_ids: get("position_ids").unwrap().shallow_clone(),
                images: media(get("pixel_values"), grids(get("image_grid_thw"))),
                videos: media(get("pixel_values_videos"), grids(get("video_grid_thw"))),
                attention_mask: None,
            }
        })
        .collect();
    Fixture {
        dir,
        config,
        batches,
    }
}
