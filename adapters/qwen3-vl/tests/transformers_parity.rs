//! Qwen3-VL against `transformers` 5.23 on the tiny random checkpoint of
//! `scripts/oracle/qwen3_vl_fixture.py` (real tokenizer and chat template): for a text-only,
//! a one-image, a two-image multi-turn (with system prompt) and a video sample, and a
//! right-padded batch of the last two,
//! - the model on transformers' inputs: logits (max abs diff ≤ 1e-4), loss (relative ≤ 1e-5)
//!   and gradients of named parameters — a DeepStack merger, the learned position embedding,
//!   a vision block, the patch bias, the merger, an LLM layer, a q-norm, the tied
//!   embeddings — (relative to the gradient's norm ≤ 1e-4);
//! - the data path from raw conversations and media (template, processor with video
//!   timestamps, collator): ids, labels (the label rule, computed by the oracle from
//!   character offsets), pixel values, grids and position ids exact, and the same loss, also
//!   for an answer holding a `<think>` block (special tokens, labeled as content);
//! - greedy generation: tokens and per-step logits, cached vs uncached, batched vs one by one.

mod common;

use common::{fixture, grids, Fixture, SAMPLES};
use lmms_ft_backbones::qwen_vl::batch::expand_videos;
use lmms_ft_core::family::{ChatTemplate, Collator, Family, HfConfig, Model, Processor, Trainable};
use lmms_ft_core::testing::max_abs_diff;
use lmms_ft_qwen3_vl::family::Qwen3Vl;
use lmms_ft_qwen3_vl::model::Qwen3VlModel;
use tch::{Device, Kind, Tensor};

/// `‖a − b‖ / ‖b‖`.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).norm().double_value(&[]);
    d / b.norm().double_value(&[]).max(f64::MIN_POSITIVE)
}

/// Logits at the real (unpadded) positions of each row.
fn masked(logits: &Tensor, mask: &Tensor) -> Tensor {
    logits * mask.unsqueeze(-1).to_kind(logits.kind())
}

#[test]
fn model_matches_transformers() {
    let fx = fixture();
    // Parameter count from the config alone equals transformers' count on the meta device.
    let printed: serde_json::Value =
        serde_json::from_str(fx.printed.lines().last().unwrap()).unwrap();
    assert_eq!(
        fx.config.num_parameters(),
        printed["num_parameters"].as_u64().unwrap()
    );
    let model = Qwen3VlModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap();
    for name in SAMPLES.iter().copied().chain(["batch"]) {
        let batch = fx.batch(name);
        for (_, mut v) in model.var_store().variables() {
            v.zero_grad();
        }
        let mask = fx.get(name, "attention_mask").unwrap();
        let logits = tch::no_grad(|| model.logits(&batch)).unwrap();
        let logit_diff = max_abs_diff(
            &masked(&logits, mask),
            &masked(fx.get(name, "logits").unwrap(), mask),
        );
        assert!(logit_diff <= 1e-4, "{name}: logits differ by {logit_diff}");
        let out = model.forward(&batch, true).unwrap();
        let loss = out.mean_loss().unwrap();
        let ours = loss.double_value(&[]);
        let theirs = fx.meta["samples"][name]["loss"].as_f64().unwrap();
        assert!(
            ((ours - theirs) / theirs).abs() <= 1e-5,
            "{name}: loss {ours} vs {theirs}"
        );
        loss.backward();
        let vars = model.var_store().variables();
        let mut compared = 0;
        let mut worst = 0.0f64;
        for (key, expected) in &fx.reference {
            if let Some(param) = key.strip_prefix(&format!("{name}.grad.")) {
                let r = rel(&vars[param].grad(), expected);
                assert!(r <= 1e-4, "{name}: grad of {param} differs by {r:.2e}");
                worst = worst.max(r);
                compared += 1;
            }
        }
        let expected = if name == "text" { 3 } else { 8 };
        assert_eq!(compared, expected, "{name}: gradients compared");
        eprintln!(
            "{name}: logits max diff {logit_diff:.2e}, loss {ours:.7} vs {theirs:.7}, \
             {compared} gradients within {worst:.2e}"
        );
    }
}

/// Pixel values back in [0, 1] units, `(x − mean) / std` undone up to the mean.
fn pixel_diff(ours: &Tensor, theirs: &Tensor, std: f32) -> Tensor {
    (ours - theirs).abs() * f64::from(std)
}

fn check_media(fx: &Fixture, name: &str, media: &lmms_ft_backbones::qwen_vl::processor::QwenMedia) {
    let get = |k: &str| fx.get(name, k);
    assert_eq!(media.image_grids, grids(get("image_grid_thw")), "{name}");
    assert_eq!(media.video_grids, grids(get("video_grid_thw")), "{name}");
    if let Some(expected) = get("pixel_values") {
        let ours = Tensor::from_slice(&media.image_patches).view([-1, expected.size()[1]]);
        let diff = pixel_diff(&ours, expected, 0.5);
        let first = media.image_grids[0];
        let n_first = first[0] * first[1] * first[2];
        // image_a (96×64) needs no resize: exact. image_b (100×60) is resized: ≤ 2/255.
        let exact = diff.narrow(0, 0, n_first).max().double_value(&[]);
        assert!(exact <= 1e-6, "{name}: unresized pixels differ by {exact}");
        let all = diff.max().double_value(&[]);
        assert!(
            all <= 2.0 / 255.0 + 1e-6,
            "{name}: resized pixels differ by {all}"
        );
    }
    if let Some(expected) = get("pixel_values_videos") {
        let ours = Tensor::from_slice(&media.video_patches).view([-1, expected.size()[1]]);
        let d = max_abs_diff(&ours, expected);
        assert!(d <= 1e-6, "{name}: video pixels differ by {d}");
    }
}

#[test]
fn data_path_matches_transformers() {
    let fx = fixture();
    let template = Qwen3Vl::template(&fx.config, &fx.dir).unwrap();
    let processor = Qwen3Vl::processor(&fx.config, &fx.dir, &Default::default()).unwrap();
    let collator = Qwen3Vl::collator(&fx.config);
    let model = Qwen3VlModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap();
    let sample = |name: &str| {
        let media = fx.media(name);
        let (media, tokens) = processor.process(&media.images, &media.videos).unwrap();
        check_media(fx, name, &media);
        let text = template
            .encode(&fx.conversation(name), &tokens, false)
            .unwrap();
        Qwen3Vl::sample(text, media)
    };
    let ids_of = |t: &Tensor| -> Vec<i64> { Vec::try_from(t.flatten(0, -1)).unwrap() };
    for name in SAMPLES.iter().copied().chain(["think"]) {
        let mut s = sample(name);
        let labels = s.text.labels.clone();
        assert_eq!(
            labels,
            ids_of(fx.get(name, "rule_labels").unwrap()),
            "{name}: labels"
        );
        let batch = collator.collate(vec![s.clone()], Device::Cpu).unwrap();
        expand_videos(&mut s, fx.config.video_token_id).unwrap();
        assert_eq!(
            s.text.input_ids,
            ids_of(fx.get(name, "input_ids").unwrap()),
            "{name}: input ids"
        );
        assert_eq!(
            max_abs_diff(&batch.input_ids, fx.get(name, "input_ids").unwrap()),
            0.0,
            "{name}: collated ids"
        );
        assert_eq!(
            max_abs_diff(&batch.position_ids, fx.get(name, "position_ids").unwrap()),
            0.0,
            "{name}: positions"
        );
        let out = tch::no_grad(|| model.forward(&batch, false)).unwrap();
        let loss = out.mean_loss().unwrap().double_value(&[]);
        let expected = fx.meta["samples"][name]["rule_loss"].as_f64().unwrap();
        assert!(
            ((loss - expected) / expected).abs() <= 1e-5,
            "{name}: loss {loss} vs {expected}"
        );
        eprintln!(
            "pipeline {name}: ids, labels, media, positions equal; loss {loss:.7} vs {expected:.7}"
        );
    }

    // The batch of two, right-padded by our collator as by transformers' processor.
    let rows = ["two_images", "video"];
    let batch = collator
        .collate(rows.iter().map(|n| sample(n)).collect(), Device::Cpu)
        .unwrap();
    let mask = fx.get("batch", "attention_mask").unwrap();
    let real = |t: &Tensor| t * mask;
    assert_eq!(
        max_abs_diff(
            &real(&batch.input_ids),
            &real(fx.get("batch", "input_ids").unwrap())
        ),
        0.0,
        "batch: input ids"
    );
    assert_eq!(
        max_abs_diff(
            &batch.position_ids,
            fx.get("batch", "position_ids").unwrap()
        ),
        0.0,
        "batch: positions"
    );
    assert_eq!(
        batch.images.as_ref().unwrap().grids,
        grids(fx.get("batch", "image_grid_thw"))
    );
    let d = max_abs_diff(
        &batch.videos.as_ref().unwrap().pixels,
        fx.get("batch", "pixel_values_videos").unwrap(),
    );
    assert!(d <= 1e-6, "batch: video pixels differ by {d}");
    let logits = tch::no_grad(|| model.logits(&batch)).unwrap();
    let d = max_abs_diff(
        &masked(&logits, mask),
        &masked(fx.get("batch", "logits").unwrap(), mask),
    );
    assert!(d <= 1e-4, "batch: logits differ by {d}");
    let out = tch::no_grad(|| model.forward(&batch, false)).unwrap();
    let loss = out.mean_loss().unwrap().double_value(&[]);
    let expected = fx.meta["samples"]["batch"]["loss"].as_f64().unwrap();
    assert!(
        ((loss - expected) / expected).abs() <= 1e-5,
        "batch: loss {loss} vs {expected}"
    );
    eprintln!("pipeline batch of two: ids, positions, logits ({d:.2e}) equal; loss {loss:.7} vs {expected:.7}");
}

/// Greedy generation through the family contract against transformers'
/// `generate(do_sample=False)` (the shared
/// [`lmms_ft_core::testing::generation::check_generation`]).
#[test]
fn greedy_generation_matches_transformers() {
    use lmms_ft_core::family::PreparedConversation;
    use lmms_ft_core::testing::generation::{check_generation, GenerationCase, TOLERANCE};
    let fx = fixture();
    let cases: Vec<GenerationCase> = SAMPLES
        .into_iter()
        .map(|name| {
            let mut conversation = fx.conversation(name);
            conversation.turns.pop();
            let ids: Vec<i64> = Vec::try_from(fx.get(name, "prompt_ids").unwrap()).unwrap();
            GenerationCase {
                name: name.to_string(),
                conv: PreparedConversation {
                    conversation,
                    media: fx.media(name),
                },
                // The template's prompt holds a video as placeholders until collation.
                prompt_ids: (name != "video").then_some(ids),
                generated: Vec::try_from(fx.get(name, "generated").unwrap()).unwrap(),
                step_logits: fx.get(name, "generated_logits").unwrap().shallow_clone(),
                logit_tolerance: TOLERANCE,
            }
        })
        .collect();
    check_generation::<Qwen3Vl>(&fx.dir, &cases, 8);
}
