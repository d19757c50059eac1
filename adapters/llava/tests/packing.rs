//! `data.packing` on LLaVA-NeXT (Vicuna: CLIP + Llama) and LLaVA-NeXT-Video (the tiny
//! checkpoints transformers writes): the fixture's conversations packed into shared rows
//! (positions restarting per sample, attention confined to each sample) give the loss and
//! every parameter's gradient of the same conversations padded into a batch, through the
//! pipeline's own encoding and collation, in one row and in several.

use lmms_ft_core::data::media::{load_image, ImageLimits};
use lmms_ft_core::data::{DecodedMedia, RgbImage, VideoClip};
use lmms_ft_core::family::{DynFamily, Erased, OpenOptions, PreparedConversation};
use lmms_ft_core::testing::{assert_packing_matches_padding_in_rows, conversation_from_messages};
use lmms_ft_llava::family::Llava;
use tch::{Device, Kind};

mod common;

fn check(variant: &str) {
    let fx = common::fixture(variant);
    let dir = fx.dir();
    let limits = ImageLimits::default();
    let image_a = load_image(&dir.join("image_a.png"), &limits).unwrap();
    let image_b = load_image(&dir.join("image_b.png"), &limits).unwrap();
    // The fixture's four frames of 56 × 70 RGB8, for the variants that take videos.
    let clip = || VideoClip {
        frames: std::fs::read(dir.join("video.rgb"))
            .unwrap()
            .chunks(56 * 70 * 3)
            .map(|c| RgbImage::from_raw(56, 70, c.to_vec()).unwrap())
            .collect(),
        sampled_fps: 1.0,
    };
    let samples: Vec<PreparedConversation> = fx
        .sample_names()
        .iter()
        .map(|name| PreparedConversation {
            conversation: conversation_from_messages(&fx.meta["samples"][name]["messages"]),
            media: match name.as_str() {
                "image" => DecodedMedia {
                    images: vec![image_b.clone()],
                    videos: vec![],
                },
                "two_images" => DecodedMedia {
                    images: vec![image_a.clone(), image_b.clone()],
                    videos: vec![],
                },
                "video" => DecodedMedia {
                    images: vec![],
                    videos: vec![clip()],
                },
                _ => DecodedMedia::default(),
            },
        })
        .collect();
    let pipeline = Erased::<Llava>::NEW
        .open(
            dir,
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
fn llava_next_packed_equals_padded() {
    check("next_vicuna");
}

#[test]
fn llava_next_video_packed_equals_padded() {
    check("next_video");
}
