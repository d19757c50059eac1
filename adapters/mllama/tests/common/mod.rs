//! The tiny Llama-3.2-Vision checkpoint of `scripts/oracle/mllama_fixture.py`, made once
//! (cached across test binaries and runs), with its reference samples.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use lmms_ft_core::data::media::{load_image, ImageLimits};
use lmms_ft_core::data::RgbImage;
use lmms_ft_core::family::HfConfig;
use lmms_ft_core::loss::LossTargets;
use lmms_ft_core::testing::cached_fixture;
use lmms_ft_mllama::config::MllamaConfig;
use lmms_ft_mllama::model::{Batch, Images};
use tch::{Kind, Tensor};

pub const SAMPLES: [&str; 5] = ["text", "image", "tiles", "two_images", "wide"];

pub struct Fixture {
    pub dir: PathBuf,
    pub printed: String,
    pub config: MllamaConfig,
    pub reference: HashMap<String, Tensor>,
    pub meta: serde_json::Value,
}

// Tensors are only read after construction; tests share them across threads.
unsafe impl Sync for Fixture {}
unsafe impl Send for Fixture {}

pub fn fixture() -> &'static Fixture {
    static FX: OnceLock<Fixture> = OnceLock::new();
    FX.get_or_init(|| {
        let (dir, printed) = cached_fixture("mllama_fixture.py", "tiny");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let config = MllamaConfig::from_hf_json(&json).unwrap();
        let reference = Tensor::read_safetensors(dir.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
        let meta =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        Fixture {
            dir,
            printed,
            config,
            reference,
            meta,
        }
    })
}

impl Fixture {
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.reference.get(key)
    }

    pub fn image(&self, key: &str) -> RgbImage {
        load_image(
            &self.dir.join(format!("image_{key}.png")),
            &ImageLimits::default(),
        )
        .unwrap()
    }

    /// The decoded images of a sample, in placeholder order.
    pub fn images_of(&self, name: &str) -> Vec<RgbImage> {
        self.meta["samples"][name]["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| self.image(k.as_str().unwrap()))
            .collect()
    }

    /// The sample `name` (or `batch`) as transformers' processor made it, with `labels`.
    pub fn batch(&self, name: &str, labels: &str) -> Batch {
        let get = |k: &str| self.get(&format!("{name}.{k}"));
        let ids = get("input_ids").unwrap();
        let (b, t) = ids.size2().unwrap();
        Batch {
            input_ids: ids.shallow_clone(),
            targets: Some(LossTargets::from_labels(get(labels).unwrap()).unwrap()),
            position_ids: Tensor::arange(t, (Kind::Int64, tch::Device::Cpu))
                .unsqueeze(0)
                .expand([b, t], false)
                .contiguous(),
            images: get("pixel_values").map(|p| Images {
                pixels: p.shallow_clone(),
                aspect_ratio_ids: get("aspect_ratio_ids").unwrap().shallow_clone(),
                aspect_ratio_mask: get("aspect_ratio_mask").unwrap().shallow_clone(),
                cross_attention_mask: get("cross_attention_mask").unwrap().shallow_clone(),
            }),
        }
    }
}

/// ‖ours − theirs‖ / ‖theirs‖.
pub fn relative_error(ours: &Tensor, theirs: &Tensor) -> f64 {
    let err = (ours - theirs).norm().double_value(&[]);
    let scale = theirs.norm().double_value(&[]);
    assert!(scale > 0.0, "reference gradient is zero");
    err / scale
}
