//! The committed Phi-3-V fixture (`tests/data/phi3v`, written by
//! `scripts/oracle/phi3v_fixture.py` with the Hub's remote code) and helpers to read it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use lmms_ft_core::data::media::{load_image, ImageLimits};
use lmms_ft_core::data::{DecodedMedia, RgbImage};
use lmms_ft_core::family::PreparedConversation;
use lmms_ft_core::testing::{conversation_from_messages, repo_root};
use tch::Tensor;

pub const SAMPLES: [&str; 4] = ["text", "image", "large", "two_images"];

pub struct Fixture {
    pub dir: PathBuf,
    pub meta: serde_json::Value,
    pub reference: HashMap<String, Tensor>,
}

impl Fixture {
    pub fn load() -> Fixture {
        Fixture::at(repo_root().join("tests/data/phi3v"))
    }

    pub fn at(dir: PathBuf) -> Fixture {
        let meta = serde_json::from_str(
            &std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"),
        )
        .expect("reference.json parses");
        let reference = Tensor::read_safetensors(dir.join("reference.safetensors"))
            .expect("reference.safetensors")
            .into_iter()
            .collect();
        Fixture {
            dir,
            meta,
            reference,
        }
    }

    pub fn get(&self, sample: &str, key: &str) -> Option<&Tensor> {
        self.reference.get(&format!("{sample}.{key}"))
    }

    pub fn tensor(&self, sample: &str, key: &str) -> &Tensor {
        self.get(sample, key)
            .unwrap_or_else(|| panic!("reference {sample}.{key} is missing"))
    }

    pub fn ids(&self, sample: &str, key: &str) -> Vec<i64> {
        Vec::try_from(self.tensor(sample, key).flatten(0, -1)).unwrap()
    }

    pub fn images(&self, sample: &str) -> Vec<RgbImage> {
        self.meta["samples"][sample]["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                load_image(&self.dir.join(f.as_str().unwrap()), &ImageLimits::default()).unwrap()
            })
            .collect()
    }

    pub fn prepared(&self, sample: &str) -> PreparedConversation {
        PreparedConversation {
            conversation: conversation_from_messages(&self.meta["samples"][sample]["messages"]),
            media: DecodedMedia {
                images: self.images(sample),
                videos: vec![],
            },
        }
    }
}

/// `‖got − want‖ ≤ tol · ‖want‖`; returns the relative error.
pub fn assert_rel_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) -> f64 {
    assert_eq!(got.size(), want.size(), "{what}: shapes differ");
    let got = got.to_kind(tch::Kind::Double);
    let want = want.to_kind(tch::Kind::Double);
    let scale = want.norm().double_value(&[]);
    assert!(scale > 0.0, "{what}: reference is zero");
    let rel = (&got - &want).norm().double_value(&[]) / scale;
    assert!(rel <= tol, "{what}: relative error {rel:.3e} > {tol:.0e}");
    rel
}

/// Sample `name` encoded by our template and processor, with the reference's model-level
/// labels (every text token) in place of the label rule's.
pub fn sample_with_labels(fx: &Fixture, name: &str) -> lmms_ft_phi3_v::family::Sample {
    use lmms_ft_core::family::{ChatTemplate, EncodedText, Family, Processor};
    use lmms_ft_phi3_v::family::Phi3V;
    let config = Phi3V::config(&fx.dir).unwrap();
    let template = Phi3V::template(&config, &fx.dir).unwrap();
    let processor = Phi3V::processor(&config, &fx.dir, &Default::default()).unwrap();
    let prepared = fx.prepared(name);
    let (media, tokens) = processor.process(&prepared.media.images, &[]).unwrap();
    let text = template
        .encode(&prepared.conversation, &tokens, false)
        .unwrap();
    assert_eq!(
        text.input_ids,
        fx.ids(name, "input_ids"),
        "{name}: input ids"
    );
    Phi3V::sample(
        EncodedText {
            input_ids: text.input_ids,
            labels: fx.ids(name, "labels"),
        },
        media,
    )
}

/// A copy of a sample (tensors shared).
pub fn clone_sample(s: &lmms_ft_phi3_v::family::Sample) -> lmms_ft_phi3_v::family::Sample {
    lmms_ft_phi3_v::family::Sample {
        text: s.text.clone(),
        media: lmms_ft_phi3_v::processor::PhiMedia {
            crops: s.media.crops.iter().map(Tensor::shallow_clone).collect(),
            grids: s.media.grids.clone(),
        },
    }
}
