//! `data.packing` on Qwen2-VL and Qwen2.5-VL (the tiny checkpoints transformers writes): the
//! fixture's text, image, two-image and video conversations packed into shared rows (M-RoPE
//! positions restarting per sample, attention confined to each sample) give the loss and
//! every parameter's gradient of the same conversations padded into a batch, through the
//! pipeline's own encoding and collation, in one row and in several.

use lmms_ft_core::data::media::{load_image, ImageLimits};
use lmms_ft_core::data::{DecodedMedia, RgbImage, VideoClip};
use lmms_ft_core::family::{DynFamily, Erased, OpenOptions, PreparedConversation};
use lmms_ft_core::testing::{
    assert_packing_matches_padding_in_rows, cached_fixture, conversation_from_messages,
};
use lmms_ft_qwen2_vl::family::Qwen2Vl;
use tch::{Device, Kind};

fn check(variant: &str) {
    let (dir, _) = cached_fixture("qwen2_vl_fixture.py", variant);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let limits = ImageLimits::default();
    let image_a = load_image(&dir.join("image_a.png"), &limits).unwrap();
    let image_b = load_image(&dir.join("image_b.png"), &limits).unwrap();
    let raw = std::fs::read(dir.join("video.rgb")).unwrap();
    let clip = VideoClip {
        frames: raw
            .chunks(56 * 56 * 3)
            .map(|c| RgbImage::from_raw(56, 56, c.to_vec()).unwrap())
            .collect(),
        sampled_fps: 24.0,
    };
    let samples: Vec<PreparedConversation> = ["text", "image", "two_images", "video"]
        .iter()
        .map(|&name| PreparedConversation {
            conversation: conversation_from_messages(&meta["samples"][name]["messages"]),
            media: match name {
                "image" => DecodedMedia {
                    images: vec![image_a.clone()],
                    videos: vec![],
                },
                "two_images" => DecodedMedia {
                    images: vec![image_a.clone(), image_b.clone()],
                    videos: vec![],
                },
                "video" => DecodedMedia {
                    images: vec![],
                    videos: vec![clip.clone()],
                },
                _ => DecodedMedia::default(),
            },
        })
        .collect();
    let pipeline = Erased::<Qwen2Vl>::NEW
        .open(
            &dir,
            OpenOptions {
                device: Device::Cpu,
                kind: Kind::Float,
                processor: Default::default(),
            },
            None,
        )
        .unwrap();
    assert_packing_matches_padding_in_rows(pipeline.as_ref(), &samples, variant);
}

#[test]
fn qwen2_vl_packed_equals_padded() {
    check("qwen2_vl");
}

#[test]
fn qwen2_5_vl_packed_equals_padded() {
    check("qwen2_5_vl");
}
