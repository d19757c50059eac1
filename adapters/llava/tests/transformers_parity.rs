//! The LLaVA family (1.5, a feature-layer list, Interleave, NeXT with Vicuna and Mistral text,
//! NeXT-Video with average and max pooling, OneVision) against `transformers` 5.23 on tiny random checkpoints saved by
//! `scripts/oracle/llava_fixture.py`, fed with transformers' own processor outputs: per-image
//! and per-video placeholder counts (exact), logits (max abs diff ≤ 1e-4), loss (relative
//! ≤ 1e-5) and the gradients of named parameters (≤ 1e-4 relative to their largest entry),
//! for a text-only, a one-image (non-square, resized) and a two-image two-turn sample, plus a
//! four-frame video sample for the video architectures. Also checks the parameter count
//! computed from the saved config alone against transformers' count on the meta device.
//!
//! Then the data path (`check_pipeline`): our template (the Vicuna training template for the
//! Llama variants, the Hub one otherwise), processor and collator, built from the fixture
//! directory, turn the same conversations and images into the ids transformers' processor
//! makes of the same template text, the labels of the label rule (computed by the oracle from
//! character offsets), transformers' pixel values (≤ 2/255 before normalisation, exact for a
//! tile that needs no resize; video frames the same, exact where no resize is needed) and the
//! same loss.

use std::collections::HashMap;
use std::path::Path;

use lmms_ft_core::data::media::{load_image, ImageLimits};
use lmms_ft_core::data::{RgbImage, VideoClip};
use lmms_ft_core::family::{ChatTemplate, Collator, Family, HfConfig, Model, Processor, Trainable};
use lmms_ft_core::testing::{conversation_from_messages, max_abs_diff};
use lmms_ft_llava::anyres::{anyres_image_tokens, video_tokens, Tiling};
use lmms_ft_llava::config::{Architecture, LlavaConfig};
use lmms_ft_llava::family::Llava;
use lmms_ft_llava::model::LlavaModel;

mod common;
use common::{fixture, fixture_video, ints};
use tch::{Device, Kind, Tensor};

/// Placeholder tokens per image as lmms-ft computes them from the config; `alone`: the
/// sample's only image (OneVision tiles only those).
fn expected_tokens(config: &LlavaConfig, size: [i64; 2], alone: bool) -> i64 {
    if !config.architecture.anyres() {
        return config.tokens_per_tile();
    }
    if config.architecture == Architecture::LlavaOnevision && !alone {
        return config.tokens_per_tile() + 1;
    }
    let tile = config.vision.image_size();
    let tiling = Tiling::new(size, &config.image_grid_pinpoints, tile).unwrap();
    anyres_image_tokens(
        size,
        tiling,
        tile / config.vision.patch_size(),
        config.tokens_per_tile(),
        config.max_patches,
    )
}

fn check_variant(variant: &str) {
    let fx = fixture(variant);
    let (config, out, reference, meta) = (&fx.config, fx.dir(), &fx.reference, &fx.meta);
    assert_eq!(
        config.num_parameters(),
        fx.printed["num_parameters"].as_u64().unwrap(),
        "{variant}: parameter count"
    );

    let model = LlavaModel::load(config, out, Device::Cpu, Kind::Float).unwrap();
    let names = fx.sample_names();
    let video_arch = config.architecture.video();
    assert_eq!(
        names.len(),
        if video_arch { 4 } else { 3 },
        "{variant}: samples"
    );
    for name in &names {
        let name = name.as_str();
        let get = |k: &str| fx.get(name, k);
        let sample = &meta["samples"][name];
        let batch = fx.batch(name);
        let alone = batch.image_sizes.len() == 1;
        let counts: Vec<i64> = batch
            .image_sizes
            .iter()
            .map(|&s| expected_tokens(config, s, alone))
            .collect();
        assert_eq!(
            counts,
            ints(&sample["tokens_per_image"]),
            "{variant}/{name}: placeholder tokens per image"
        );
        let grid = config.vision.image_size() / config.vision.patch_size();
        let stride = config.video_pool.map(|(_, s)| s);
        let video_counts: Vec<i64> = batch
            .video_frames
            .iter()
            .map(|&f| video_tokens(f, grid, stride))
            .collect();
        assert_eq!(
            video_counts,
            ints(&sample["tokens_per_video"]),
            "{variant}/{name}: placeholder tokens per video"
        );
        for (_, mut v) in model.var_store().variables() {
            v.zero_grad();
        }
        let logits = tch::no_grad(|| model.logits(&batch)).unwrap();
        let logit_diff = max_abs_diff(&logits, get("logits").unwrap());
        let result = model.forward(&batch, true).unwrap();
        assert!(
            logit_diff <= 1e-4,
            "{variant}/{name}: logits differ by {logit_diff}"
        );
        let loss = result.mean_loss().unwrap();
        let ours = loss.double_value(&[]);
        let expected = sample["loss"].as_f64().unwrap();
        assert!(
            ((ours - expected) / expected).abs() <= 1e-5,
            "{variant}/{name}: loss {ours} vs {expected}"
        );
        loss.backward();
        let vars = model.var_store().variables();
        let mut compared = 0;
        for (key, expected) in reference {
            if let Some(param) = key.strip_prefix(&format!("{name}.grad.")) {
                let var = vars
                    .get(param)
                    .unwrap_or_else(|| panic!("{variant}: no variable {param}"));
                // Relative to the gradient's size: vision gradients are ~1e-4 in absolute terms.
                let d = max_abs_diff(&var.grad(), expected);
                let scale = expected.abs().max().double_value(&[]);
                assert!(
                    scale > 0.0,
                    "{variant}/{name}: reference grad of {param} is zero"
                );
                assert!(
                    d <= 1e-4 * scale,
                    "{variant}/{name}: grad of {param} differs by {d} (max |grad| {scale})"
                );
                compared += 1;
            }
        }
        let min = if name == "text" { 3 } else { 7 };
        assert!(
            compared >= min,
            "{variant}/{name}: only {compared} gradients compared"
        );
        eprintln!("{variant}/{name}: logits max diff {logit_diff:.2e}, loss {ours:.6} vs {expected:.6}, {compared} grads");
    }
    check_pipeline(variant, out, config, reference, meta);
}

fn check_pipeline(
    variant: &str,
    dir: &Path,
    config: &LlavaConfig,
    reference: &HashMap<String, Tensor>,
    meta: &serde_json::Value,
) {
    let template = Llava::template(config, dir).unwrap();
    let vicuna = matches!(
        variant,
        "llava" | "llava_multi" | "next_vicuna" | "next_video" | "next_video_max"
    );
    assert_eq!(
        template.training_template, vicuna,
        "{variant}: template choice"
    );
    let processor = Llava::processor(config, dir, &Default::default()).unwrap();
    assert_eq!(
        processor.transform.pad_to_square.is_some(),
        variant == "llava",
        "{variant}: pad-to-square choice"
    );
    if !config.architecture.video() {
        // No transformers oracle takes a video for these (LlavaProcessor has no video path):
        // a video is refused with the hint to give its frames as images.
        let clip = VideoClip {
            frames: vec![RgbImage::new(56, 56)],
            sampled_fps: 1.0,
        };
        let err = format!("{:#}", processor.process(&[], &[clip]).unwrap_err());
        assert!(err.contains("frames as images"), "{variant}: {err}");
    }
    let collator = Llava::collator(config);
    let model = LlavaModel::load(config, dir, Device::Cpu, Kind::Float).unwrap();
    let limits = ImageLimits::default();
    let image_a = load_image(&dir.join("image_a.png"), &limits).unwrap();
    let image_b = load_image(&dir.join("image_b.png"), &limits).unwrap();
    let std = Tensor::from_slice(&processor.transform.normalize.unwrap().1).view([1, 3, 1, 1]);
    let names = ["text", "image", "two_images", "video"];
    for name in names
        .into_iter()
        .filter(|n| meta["samples"].get(n).is_some())
    {
        let get = |k: &str| reference.get(&format!("{name}.{k}"));
        let sample = &meta["samples"][name];
        let conv = conversation_from_messages(&sample["messages"]);
        let images = match name {
            "image" => vec![image_b.clone()],
            "two_images" => vec![image_a.clone(), image_b.clone()],
            _ => vec![],
        };
        let videos = match name {
            "video" => vec![fixture_video(dir)],
            _ => vec![],
        };
        let (media, tokens) = processor.process(&images, &videos).unwrap();
        assert_eq!(
            tokens.videos.iter().map(|&n| n as i64).collect::<Vec<_>>(),
            ints(&sample["tokens_per_video"]),
            "{variant}/{name}: processor video tokens"
        );
        let text = template.encode(&conv, &tokens, false).unwrap();
        let ids: Vec<i64> = Vec::try_from(get("rule_input_ids").unwrap().flatten(0, -1)).unwrap();
        assert_eq!(text.input_ids, ids, "{variant}/{name}: input ids");
        let rule: Vec<i64> = Vec::try_from(get("rule_labels").unwrap().flatten(0, -1)).unwrap();
        assert_eq!(text.labels, rule, "{variant}/{name}: labels");
        let prompt = template.encode_prompt(&conv, &tokens).unwrap();
        assert!(
            text.input_ids.starts_with(&prompt) && prompt.len() < text.input_ids.len(),
            "{variant}/{name}: the generation prompt is not a prefix of the training ids"
        );
        if let Some(theirs) = get("pixel_values") {
            let s = config.vision.image_size();
            let ours = Tensor::from_slice(&media.pixels).view([-1, 3, s, s]);
            // NeXT pads every image to the most tiles; keep each image's own tiles.
            let theirs = if theirs.dim() == 5 {
                let per: Vec<Tensor> = media
                    .image_sizes
                    .iter()
                    .zip(&media.image_anyres)
                    .enumerate()
                    .map(|(i, (&size, &anyres))| {
                        let n = if anyres {
                            Tiling::new(size, &config.image_grid_pinpoints, s)
                                .unwrap()
                                .num_tiles()
                        } else {
                            1
                        };
                        theirs.get(i as i64).narrow(0, 0, n)
                    })
                    .collect();
                Tensor::cat(&per, 0)
            } else {
                theirs.shallow_clone()
            };
            assert_eq!(ours.size(), theirs.size(), "{variant}/{name}: tiles");
            // Compare before normalisation, in [0, 1] pixel units.
            let diff = ((&ours - &theirs) * &std).abs();
            let all = diff.max().double_value(&[]);
            assert!(
                all <= 2.0 / 255.0 + 1e-6,
                "{variant}/{name}: pixel values differ by {all}"
            );
            if variant == "llava_multi" && name == "two_images" {
                // image_a is 56 wide: its shortest edge needs no resize, only the crop.
                let exact = diff.get(0).max().double_value(&[]);
                assert!(
                    exact <= 1e-6,
                    "{variant}: unresized tile differs by {exact}"
                );
            }
        }
        if let Some(theirs) = get("pixel_values_videos") {
            let s = config.vision.image_size();
            let ours = Tensor::from_slice(&media.video_pixels).view([-1, 3, s, s]);
            let theirs = theirs.flatten(0, 1);
            assert_eq!(ours.size(), theirs.size(), "{variant}/{name}: frames");
            let vstd = Tensor::from_slice(
                &processor
                    .video
                    .as_ref()
                    .unwrap()
                    .transform
                    .normalize
                    .unwrap()
                    .1,
            )
            .view([1, 3, 1, 1]);
            let diff = ((&ours - &theirs) * &vstd).abs().max().double_value(&[]);
            // NeXT-Video's frames need no resize (shortest edge 56), only the center crop;
            // OneVision's are resized by torchvision in transformers, by PIL's filter here.
            let tolerance = if variant == "next_video" {
                1e-6
            } else {
                3.0 / 255.0
            };
            assert!(
                diff <= tolerance,
                "{variant}/{name}: video pixel values differ by {diff}"
            );
            eprintln!(
                "{variant}/{name}: video frames within {:.3}/255",
                diff * 255.0
            );
        }
        let batch = collator
            .collate(vec![Llava::sample(text, media)], Device::Cpu)
            .unwrap();
        let out = tch::no_grad(|| model.forward(&batch, false)).unwrap();
        let loss = out.mean_loss().unwrap().double_value(&[]);
        let expected = sample["rule_loss"].as_f64().unwrap();
        assert!(
            ((loss - expected) / expected).abs() <= 1e-5,
            "{variant}/{name}: loss {loss} vs {expected}"
        );
        eprintln!(
            "pipeline {variant}/{name}: ids, labels, pixels equal; loss {loss:.6} vs {expected:.6}"
        );
    }
}

#[test]
fn llava_1_5_matches_transformers() {
    check_variant("llava");
}

#[test]
fn llava_feature_layer_list_matches_transformers() {
    check_variant("llava_multi");
}

#[test]
fn llava_interleave_matches_transformers() {
    check_variant("interleave");
}

#[test]
fn llava_next_vicuna_matches_transformers() {
    check_variant("next_vicuna");
}

#[test]
fn llava_next_mistral_matches_transformers() {
    check_variant("next_mistral");
}

#[test]
fn llava_next_video_matches_transformers() {
    check_variant("next_video");
}

#[test]
fn llava_next_video_max_pooling_matches_transformers() {
    check_variant("next_video_max");
}

#[test]
fn llava_onevision_matches_transformers() {
    check_variant("onevision");
}
