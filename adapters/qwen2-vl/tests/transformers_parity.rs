//! Qwen2-VL and Qwen2.5-VL against `transformers` 5.23 on tiny random checkpoints saved by
//! `scripts/oracle/qwen2_vl_fixture.py`: rope position ids (exact), logits (max abs diff ≤
//! 1e-4), loss (relative ≤ 1e-5) and gradients of named parameters (≤ 1e-4), for a text-only,
//! a one-image, a two-image multi-turn (with system prompt) and a video sample.

use std::collections::HashMap;
use std::path::Path;

use lmms_ft_core::data::media::{load_image, ImageLimits};
use lmms_ft_core::data::{RgbImage, VideoClip};
use lmms_ft_core::family::{ChatTemplate, Collator, Family, HfConfig, Model, Processor, Trainable};
use lmms_ft_core::loss::LossTargets;
use lmms_ft_core::testing::{cached_fixture, conversation_from_messages, max_abs_diff};
use lmms_ft_qwen2_vl::config::{Qwen2VlConfig, Variant};
use lmms_ft_qwen2_vl::family::Qwen2Vl;
use lmms_ft_qwen2_vl::model::{Batch, Media, Qwen2VlModel};
use lmms_ft_qwen2_vl::rope::{position_ids, RopeSpec};
use tch::{Device, Kind, Tensor};

fn grids(t: Option<&Tensor>) -> Vec<[i64; 3]> {
    let Some(t) = t else { return vec![] };
    let v: Vec<i64> = Vec::try_from(t.flatten(0, -1)).unwrap();
    v.chunks(3).map(|c| [c[0], c[1], c[2]]).collect()
}

fn check_variant(variant: &str) {
    let (out, printed) = cached_fixture("qwen2_vl_fixture.py", variant);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let config = Qwen2VlConfig::from_hf_json(&json).unwrap();
    assert_eq!(
        config.variant,
        if variant == "qwen2_vl" {
            Variant::Qwen2Vl
        } else {
            Variant::Qwen25Vl
        }
    );
    // Parameter count from the config alone equals transformers' count on the meta device.
    let expected_params: serde_json::Value =
        serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    assert_eq!(
        config.num_parameters(),
        expected_params["num_parameters"].as_u64().unwrap()
    );

    let model = Qwen2VlModel::load(&config, &out, Device::Cpu, Kind::Float).unwrap();
    let reference: HashMap<String, Tensor> =
        Tensor::read_safetensors(out.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("reference.json")).unwrap())
            .unwrap();
    let spec = RopeSpec {
        image_token_id: config.image_token_id,
        video_token_id: config.video_token_id,
        spatial_merge_size: config.vision.spatial_merge_size,
        tokens_per_second: (config.variant == Variant::Qwen25Vl)
            .then_some(config.vision.tokens_per_second),
    };
    for name in ["text", "image", "two_images", "video"] {
        let get = |k: &str| reference.get(&format!("{name}.{k}"));
        let ids_t = get("input_ids").unwrap();
        let ids: Vec<i64> = Vec::try_from(ids_t.flatten(0, -1)).unwrap();
        let image_grids = grids(get("image_grid_thw"));
        let video_grids = grids(get("video_grid_thw"));
        let seconds: Vec<f64> = get("second_per_grid_ts")
            .map(|t| Vec::try_from(t.to_kind(Kind::Double)).unwrap())
            .unwrap_or_else(|| vec![1.0; video_grids.len()]);
        let pos = position_ids(
            &ids,
            &spec,
            &mut image_grids.clone().into_iter(),
            &mut video_grids.clone().into_iter().zip(seconds),
        )
        .unwrap();
        let pos_t = Tensor::from_slice(&pos.concat()).view([3, 1, -1]);
        assert_eq!(
            max_abs_diff(&pos_t, get("position_ids").unwrap()),
            0.0,
            "{variant}/{name}: position ids"
        );

        let labels = get("labels").unwrap();
        let media = |pixels: Option<&Tensor>, grids: Vec<[i64; 3]>| {
            pixels.map(|p| Media {
                pixels: p.shallow_clone(),
                grids,
            })
        };
        let batch = Batch {
            input_ids: ids_t.shallow_clone(),
            targets: Some(LossTargets::from_labels(labels).unwrap()),
            position_ids: pos_t,
            images: media(get("pixel_values"), image_grids),
            videos: media(get("pixel_values_videos"), video_grids),
            attention_mask: None,
        };
        for (_, mut v) in model.var_store().variables() {
            v.zero_grad();
        }
        let logits = tch::no_grad(|| model.logits(&batch)).unwrap();
        let logit_diff = max_abs_diff(&logits, get("logits").unwrap());
        let out = model.forward(&batch, true).unwrap();
        assert!(
            logit_diff <= 1e-4,
            "{variant}/{name}: logits differ by {logit_diff}"
        );
        let loss = out.mean_loss().unwrap();
        let ours = loss.double_value(&[]);
        let theirs = meta["samples"][name]["loss"].as_f64().unwrap();
        assert!(
            ((ours - theirs) / theirs).abs() <= 1e-5,
            "{variant}/{name}: loss {ours} vs {theirs}"
        );
        loss.backward();
        let vars = model.var_store().variables();
        let mut compared = 0;
        for (key, expected) in &reference {
            if let Some(param) = key.strip_prefix(&format!("{name}.grad.")) {
                let d = max_abs_diff(&vars[param].grad(), expected);
                assert!(
                    d <= 1e-4,
                    "{variant}/{name}: grad of {param} differs by {d}"
                );
                compared += 1;
            }
        }
        let media_sample = name != "text";
        assert!(
            compared >= if media_sample { 4 } else { 2 },
            "{variant}/{name}: only {compared} gradients compared"
        );
        eprintln!(
            "{variant}/{name}: logits max diff {logit_diff:.2e}, loss {ours:.6} vs {theirs:.6}"
        );
    }
    check_pipeline(&out, &config, &reference, &meta);
}

/// The data path: the Hub chat template, our processor and collator turn the same
/// conversations and media into the same ids, labels (the label rule, computed by the oracle
/// from character offsets), patches, grids and positions, and the same loss.
fn check_pipeline(
    dir: &Path,
    config: &Qwen2VlConfig,
    reference: &HashMap<String, Tensor>,
    meta: &serde_json::Value,
) {
    let template = Qwen2Vl::template(config, dir).unwrap();
    let processor = Qwen2Vl::processor(config, dir, &Default::default()).unwrap();
    let collator = Qwen2Vl::collator(config);
    let model = Qwen2VlModel::load(config, dir, Device::Cpu, Kind::Float).unwrap();
    let limits = ImageLimits::default();
    let image_a = load_image(&dir.join("image_a.png"), &limits).unwrap();
    let image_b = load_image(&dir.join("image_b.png"), &limits).unwrap();
    let raw = std::fs::read(dir.join("video.rgb")).unwrap();
    let frames: Vec<RgbImage> = raw
        .chunks(56 * 56 * 3)
        .map(|c| RgbImage::from_raw(56, 56, c.to_vec()).unwrap())
        .collect();
    // transformers assumes 24 fps for raw frames given without metadata.
    let clip = VideoClip {
        frames,
        sampled_fps: 24.0,
    };
    for name in ["text", "image", "two_images", "video"] {
        let get = |k: &str| reference.get(&format!("{name}.{k}"));
        let conv = conversation_from_messages(&meta["samples"][name]["messages"]);
        let (images, videos) = match name {
            "image" => (vec![image_a.clone()], vec![]),
            "two_images" => (vec![image_a.clone(), image_b.clone()], vec![]),
            "video" => (vec![], vec![clip.clone()]),
            _ => (vec![], vec![]),
        };
        let (media, tokens) = processor.process(&images, &videos).unwrap();
        let text = template.encode(&conv, &tokens, false).unwrap();
        let ids: Vec<i64> = Vec::try_from(get("input_ids").unwrap().flatten(0, -1)).unwrap();
        assert_eq!(text.input_ids, ids, "{name}: input ids");
        let rule: Vec<i64> = Vec::try_from(get("rule_labels").unwrap().flatten(0, -1)).unwrap();
        assert_eq!(text.labels, rule, "{name}: labels");
        assert_eq!(
            media.image_grids,
            grids(get("image_grid_thw")),
            "{name}: image grids"
        );
        assert_eq!(
            media.video_grids,
            grids(get("video_grid_thw")),
            "{name}: video grids"
        );
        if let Some(expected) = get("pixel_values") {
            let ours = Tensor::from_slice(&media.image_patches).view([-1, expected.size()[1]]);
            // Compare before normalisation: (x − mean) / std back to [0, 1] pixel units.
            let std = Tensor::from_slice(&processor.std)
                .view([3, 1])
                .repeat([1, expected.size()[1] / 3])
                .view([1, -1]);
            let diff = ((&ours - expected) * std).abs();
            let first = grids(get("image_grid_thw"))[0];
            let n_first = first[0] * first[1] * first[2];
            // image_a (84×56) needs no resize: exact. image_b (100×60) is resized: ≤ 2/255.
            let exact = diff.narrow(0, 0, n_first).max().double_value(&[]);
            assert!(
                exact <= 1e-6,
                "{name}: unresized pixel values differ by {exact}"
            );
            let all = diff.max().double_value(&[]);
            assert!(
                all <= 2.0 / 255.0 + 1e-6,
                "{name}: resized pixel values differ by {all}"
            );
        }
        if let Some(expected) = get("pixel_values_videos") {
            let ours = Tensor::from_slice(&media.video_patches).view([-1, expected.size()[1]]);
            let d = max_abs_diff(&ours, expected);
            assert!(d <= 1e-5, "{name}: video pixel values differ by {d}");
        }
        let batch = collator
            .collate(vec![Qwen2Vl::sample(text, media)], Device::Cpu)
            .unwrap();
        assert_eq!(
            max_abs_diff(&batch.position_ids, get("position_ids").unwrap()),
            0.0,
            "{name}: positions"
        );
        let out = tch::no_grad(|| model.forward(&batch, false)).unwrap();
        let loss = out.mean_loss().unwrap().double_value(&[]);
        let expected = meta["samples"][name]["rule_loss"].as_f64().unwrap();
        assert!(
            ((loss - expected) / expected).abs() <= 1e-5,
            "{name}: loss {loss} vs {expected}"
        );
        eprintln!(
            "pipeline {name}: ids, labels, media, positions equal; loss {loss:.6} vs {expected:.6}"
        );
    }
}

#[test]
fn qwen2_vl_matches_transformers() {
    check_variant("qwen2_vl");
}

#[test]
fn qwen2_5_vl_matches_transformers() {
    check_variant("qwen2_5_vl");
}

/// Sharded checkpoints (with an index) load to the same weights; bf16 runs close to fp32; a
/// checkpoint of the other variant is rejected with a message naming the mismatch.
#[test]
fn sharded_bf16_and_wrong_checkpoint() {
    let (q2, _) = cached_fixture("qwen2_vl_fixture.py", "qwen2_vl");
    let (q25, _) = cached_fixture("qwen2_vl_fixture.py", "qwen2_5_vl");
    let read_config = |d: &std::path::Path| {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
        Qwen2VlConfig::from_hf_json(&json).unwrap()
    };
    let config = read_config(&q2);
    let shards = std::fs::read_dir(q2.join("sharded"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "safetensors")
        })
        .count();
    assert!(
        shards >= 2,
        "fixture should be sharded, got {shards} file(s)"
    );
    assert!(q2.join("sharded/model.safetensors.index.json").is_file());
    let single = Qwen2VlModel::load(&config, &q2, Device::Cpu, Kind::Float).unwrap();
    let sharded =
        Qwen2VlModel::load(&config, &q2.join("sharded"), Device::Cpu, Kind::Float).unwrap();
    let a = single.var_store().variables();
    let b = sharded.var_store().variables();
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert_eq!(max_abs_diff(t, &b[name]), 0.0, "{name}");
    }

    // bf16 weights and compute: logits stay close to fp32 (bf16 has ~3 significant digits).
    let reference: HashMap<String, Tensor> =
        Tensor::read_safetensors(q2.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let ids = &reference["two_images.input_ids"];
    let ids_v: Vec<i64> = Vec::try_from(ids.flatten(0, -1)).unwrap();
    let image_grids = grids(reference.get("two_images.image_grid_thw"));
    let spec = RopeSpec {
        image_token_id: config.image_token_id,
        video_token_id: config.video_token_id,
        spatial_merge_size: config.vision.spatial_merge_size,
        tokens_per_second: None,
    };
    let pos = position_ids(
        &ids_v,
        &spec,
        &mut image_grids.clone().into_iter(),
        &mut std::iter::empty(),
    )
    .unwrap();
    let batch = Batch {
        input_ids: ids.shallow_clone(),
        targets: None,
        position_ids: Tensor::from_slice(&pos.concat()).view([3, 1, -1]),
        images: Some(Media {
            pixels: reference["two_images.pixel_values"].shallow_clone(),
            grids: image_grids,
        }),
        videos: None,
        attention_mask: None,
    };
    let bf16 = Qwen2VlModel::load(&config, &q2, Device::Cpu, Kind::BFloat16).unwrap();
    let out = tch::no_grad(|| bf16.forward(&batch, false)).unwrap();
    assert!(out.loss_sum.is_none());
    let logits = tch::no_grad(|| bf16.logits(&batch)).unwrap();
    assert_eq!(logits.kind(), Kind::BFloat16);
    let d = max_abs_diff(&logits, &reference["two_images.logits"]);
    assert!(d < 0.05, "bf16 logits differ from fp32 by {d}");

    // A Qwen2.5-VL checkpoint under a Qwen2-VL config: names and shapes differ.
    let err = Qwen2VlModel::load(&config, &q25, Device::Cpu, Kind::Float)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("another model"), "{err}");
}

/// Greedy generation through the family contract against transformers'
/// `generate(do_sample=False)` for a text, an image, a two-image and a video prompt: reply
/// tokens, per-step logits, cached vs uncached and batched vs one by one (the shared
/// [`lmms_ft_core::testing::generation::check_generation`]).
fn check_generation_of(variant: &str) {
    use lmms_ft_core::family::PreparedConversation;
    use lmms_ft_core::testing::generation::{check_generation, GenerationCase, TOLERANCE};
    let (dir, _) = cached_fixture("qwen2_vl_fixture.py", variant);
    let reference: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let image_a = load_image(&dir.join("image_a.png"), &ImageLimits::default()).unwrap();
    let image_b = load_image(&dir.join("image_b.png"), &ImageLimits::default()).unwrap();
    let raw = std::fs::read(dir.join("video.rgb")).unwrap();
    let frames: Vec<RgbImage> = raw
        .chunks(56 * 56 * 3)
        .map(|c| RgbImage::from_raw(56, 56, c.to_vec()).unwrap())
        .collect();
    let cases: Vec<GenerationCase> = ["text", "image", "two_images", "video"]
        .into_iter()
        .map(|name| {
            let mut media = lmms_ft_core::data::DecodedMedia::default();
            match name {
                "image" => media.images.push(image_a.clone()),
                "two_images" => media.images.extend([image_a.clone(), image_b.clone()]),
                "video" => media.videos.push(VideoClip {
                    frames: frames.clone(),
                    sampled_fps: 24.0,
                }),
                _ => {}
            }
            let mut conversation = conversation_from_messages(&meta["samples"][name]["messages"]);
            conversation.turns.pop();
            GenerationCase {
                name: format!("{variant}/{name}"),
                conv: PreparedConversation {
                    conversation,
                    media,
                },
                prompt_ids: None,
                generated: Vec::try_from(&reference[&format!("{name}.generated")]).unwrap(),
                step_logits: reference[&format!("{name}.generated_logits")].shallow_clone(),
                logit_tolerance: TOLERANCE,
            }
        })
        .collect();
    check_generation::<Qwen2Vl>(&dir, &cases, 8);
}

#[test]
fn qwen2_vl_greedy_generation_matches_transformers() {
    check_generation_of("qwen2_vl");
}

#[test]
fn qwen2_5_vl_greedy_generation_matches_transformers() {
    check_generation_of("qwen2_5_vl");
}
