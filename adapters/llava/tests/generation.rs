//! Greedy generation of every LLaVA variant (1.5, Interleave, NeXT with Vicuna and Mistral
//! text, NeXT-Video with average and max pooling, OneVision) against `transformers`'
//! `generate(do_sample=False)` on the tiny fixtures of `scripts/oracle/llava_fixture.py`:
//! prompts with no image, one image, two images over two turns and, for the video
//! architectures, a video. The checks (reply tokens, prompt ids, per-step logits, cached vs
//! uncached, batched vs one by one) are the shared
//! [`lmms_ft_core::testing::generation::check_generation`].

use lmms_ft_core::data::media::{load_image, ImageLimits};
use lmms_ft_core::data::{DecodedMedia, Role};
use lmms_ft_core::family::PreparedConversation;
use lmms_ft_core::testing::conversation_from_messages;
use lmms_ft_core::testing::generation::{check_generation, GenerationCase, TOLERANCE};
use lmms_ft_llava::family::Llava;

mod common;
use common::{fixture, fixture_video};

fn check(variant: &str) {
    let fx = fixture(variant);
    let dir = fx.dir();
    let limits = ImageLimits::default();
    let image_a = load_image(&dir.join("image_a.png"), &limits).unwrap();
    let image_b = load_image(&dir.join("image_b.png"), &limits).unwrap();
    let cases: Vec<GenerationCase> = fx
        .sample_names()
        .iter()
        .map(|name| {
            let mut conversation =
                conversation_from_messages(&fx.meta["samples"][name]["messages"]);
            let last = conversation.turns.pop().expect("a final answer");
            assert_eq!(last.role, Role::Assistant, "{variant}/{name}");
            let mut media = DecodedMedia::default();
            match name.as_str() {
                "image" => media.images.push(image_b.clone()),
                "two_images" => media.images.extend([image_a.clone(), image_b.clone()]),
                "video" => media.videos.push(fixture_video(dir)),
                _ => {}
            }
            let ids = |key: &str| -> Vec<i64> {
                Vec::try_from(fx.get(name, key).unwrap().flatten(0, -1)).unwrap()
            };
            GenerationCase {
                name: format!("{variant}/{name}"),
                conv: PreparedConversation {
                    conversation,
                    media,
                },
                prompt_ids: Some(ids("prompt_ids")),
                generated: ids("generated"),
                step_logits: fx.get(name, "generated_logits").unwrap().shallow_clone(),
                // OneVision's frames are resized by torchvision in transformers and by PIL's
                // filter here (pixels within 3/255, see transformers_parity.rs), which moves
                // the logits by a few 1e-4; the tokens must still agree.
                logit_tolerance: if variant == "onevision" && name == "video" {
                    2e-3
                } else {
                    TOLERANCE
                },
            }
        })
        .collect();
    check_generation::<Llava>(dir, &cases, 8);
}

#[test]
fn llava_1_5_generates_as_transformers() {
    check("llava");
}

#[test]
fn llava_interleave_generates_as_transformers() {
    check("interleave");
}

#[test]
fn llava_next_vicuna_generates_as_transformers() {
    check("next_vicuna");
}

#[test]
fn llava_next_mistral_generates_as_transformers() {
    check("next_mistral");
}

#[test]
fn llava_next_video_generates_as_transformers() {
    check("next_video");
}

#[test]
fn llava_next_video_max_pooling_generates_as_transformers() {
    check("next_video_max");
}

#[test]
fn llava_onevision_generates_as_transformers() {
    check("onevision");
}
