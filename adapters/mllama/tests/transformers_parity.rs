//! Llama-3.2-Vision against `transformers` 5.23 on the tiny random checkpoint of
//! `scripts/oracle/mllama_fixture.py` (real tokenizer, special tokens and chat template):
//! text-only, one image, an image on 2×2 tiles, two images in two turns, an image too wide
//! for any canvas, and a batch of two samples with different tile counts. Token ids, labels,
//! aspect ratio ids / masks and the cross-attention mask are exact, pixel values equal;
//! logits fp32 max abs diff ≤ 1e-4, loss relative ≤ 1e-5, gradients of named parameters of
//! the vision tower, projector, a cross-attention and a self-attention layer ≤ 1e-4
//! relative; greedy generation with the KV / cross-attention caches equals transformers'.

mod common;

use common::{fixture, relative_error, Fixture, SAMPLES};
use lmms_ft_core::data::DecodedMedia;
use lmms_ft_core::family::Trainable;
use lmms_ft_core::family::{
    ChatTemplate, Collator, Family, HfConfig, Model, PreparedConversation, Processor,
};
use lmms_ft_core::testing::{conversation_from_messages, max_abs_diff};
use lmms_ft_mllama::family::{Mllama, Sample};
use lmms_ft_mllama::model::{Batch, MllamaModel};
use tch::{Device, Kind};

fn model(fx: &Fixture) -> MllamaModel {
    MllamaModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap()
}

/// Logits (at `rows`' real positions), loss and gradients of `batch` against the reference
/// of `name`.
fn check_model(
    fx: &Fixture,
    model: &MllamaModel,
    name: &str,
    batch: &Batch,
    loss: f64,
    lengths: &[i64],
) {
    for (_, mut v) in model.var_store().variables() {
        v.zero_grad();
    }
    let logits = tch::no_grad(|| model.logits(batch)).unwrap();
    let expected = &fx.reference[&format!("{name}.logits")];
    let mut logit_diff: f64 = 0.0;
    for (row, &len) in lengths.iter().enumerate() {
        let ours = logits.get(row as i64).narrow(0, 0, len);
        let theirs = expected.get(row as i64).narrow(0, 0, len);
        logit_diff = logit_diff.max(max_abs_diff(&ours, &theirs));
    }
    assert!(logit_diff <= 1e-4, "{name}: logits differ by {logit_diff}");
    let out = model.forward(batch, true).unwrap();
    let ours = out.mean_loss().unwrap();
    let l = ours.double_value(&[]);
    assert!(
        ((l - loss) / loss).abs() <= 1e-5,
        "{name}: loss {l} vs {loss}"
    );
    ours.backward();
    let vars = model.var_store().variables();
    let prefix = format!("{name}.grad.");
    let mut compared = Vec::new();
    let mut worst: f64 = 0.0;
    for (key, theirs) in &fx.reference {
        if let Some(param) = key.strip_prefix(&prefix) {
            let grad = vars[param].grad();
            assert!(grad.defined(), "{name}: no gradient reached {param}");
            let e = relative_error(&grad, theirs);
            assert!(
                e <= 1e-4,
                "{name}: gradient of {param} differs by {e:.2e} (relative)"
            );
            worst = worst.max(e);
            compared.push(param.to_string());
        }
    }
    let has_images = batch.images.is_some();
    for part in [
        "vision_model.",
        "multi_modal_projector",
        "cross_attn",
        "self_attn",
    ] {
        let expected_here = has_images
            || !(part.starts_with("vision") || part.starts_with("multi") || part == "cross_attn");
        assert_eq!(
            compared.iter().any(|p| p.contains(part)),
            expected_here,
            "{name}: gradients compared: {compared:?}"
        );
    }
    eprintln!(
        "{name}: logits max diff {logit_diff:.2e}, loss {l:.6} vs {loss:.6}, {} gradients within {worst:.2e}",
        compared.len()
    );
}

#[test]
fn model_matches_transformers_on_processor_inputs() {
    let fx = fixture();
    // Parameter count from the config alone equals transformers' count on the meta device.
    let printed: serde_json::Value =
        serde_json::from_str(fx.printed.lines().last().unwrap()).unwrap();
    assert_eq!(
        fx.config.num_parameters(),
        printed["num_parameters"].as_u64().unwrap()
    );
    let model = model(fx);
    for name in SAMPLES {
        let batch = fx.batch(name, "labels");
        let loss = fx.meta["samples"][name]["loss"].as_f64().unwrap();
        let len = batch.input_ids.size()[1];
        check_model(fx, &model, name, &batch, loss, &[len]);
    }
}

/// Our processor, the Hub template and our collator for one or more samples.
fn encode(fx: &Fixture, names: &[&str]) -> Batch {
    let template = Mllama::template(&fx.config, &fx.dir).unwrap();
    let processor = Mllama::processor(&fx.config, &fx.dir, &Default::default()).unwrap();
    let samples: Vec<Sample> = names
        .iter()
        .map(|name| {
            let conv = conversation_from_messages(&fx.meta["samples"][*name]["messages"]);
            let (media, tokens) = processor.process(&fx.images_of(name), &[]).unwrap();
            let text = template.encode(&conv, &tokens, false).unwrap();
            Mllama::sample(text, media)
        })
        .collect();
    Mllama::collator(&fx.config)
        .collate(samples, Device::Cpu)
        .unwrap()
}

fn assert_same_inputs(fx: &Fixture, name: &str, ours: &Batch) {
    let get = |k: &str| &fx.reference[&format!("{name}.{k}")];
    assert_eq!(
        max_abs_diff(&ours.input_ids, get("input_ids")),
        0.0,
        "{name}: input ids"
    );
    let rule = get("rule_labels");
    let targets = lmms_ft_core::loss::LossTargets::from_labels(rule).unwrap();
    let ours_t = ours.targets.as_ref().unwrap();
    assert_eq!(ours_t.count, targets.count, "{name}: label count");
    for (a, b, what) in [
        (&ours_t.labels, &targets.labels, "labels"),
        (&ours_t.positions, &targets.positions, "label positions"),
    ] {
        assert_eq!(max_abs_diff(a, b), 0.0, "{name}: {what}");
    }
    match (&ours.images, fx.get(&format!("{name}.pixel_values"))) {
        (None, None) => {}
        (Some(img), Some(pixels)) => {
            let d = max_abs_diff(&img.pixels, pixels);
            assert!(d <= 1e-6, "{name}: pixel values differ by {d}");
            for (ours, key) in [
                (&img.aspect_ratio_ids, "aspect_ratio_ids"),
                (&img.aspect_ratio_mask, "aspect_ratio_mask"),
                (&img.cross_attention_mask, "cross_attention_mask"),
            ] {
                assert_eq!(ours.size(), get(key).size(), "{name}: {key} shape");
                assert_eq!(max_abs_diff(ours, get(key)), 0.0, "{name}: {key}");
            }
        }
        (a, b) => panic!(
            "{name}: images {} vs reference {}",
            a.is_some(),
            b.is_some()
        ),
    }
}

/// The data path: the Hub chat template, our processor and collator turn the same
/// conversations and images into the same ids, labels (the label rule, computed by the
/// oracle from character offsets), tiles, aspect ratios and cross-attention masks, and the
/// same loss, one sample at a time and as a padded batch of two.
#[test]
fn processor_template_and_collator_match_transformers() {
    let fx = fixture();
    let model = model(fx);
    for name in SAMPLES {
        let batch = encode(fx, &[name]);
        assert_same_inputs(fx, name, &batch);
        let out = tch::no_grad(|| model.forward(&batch, false)).unwrap();
        let loss = out.mean_loss().unwrap().double_value(&[]);
        let expected = fx.meta["samples"][name]["rule_loss"].as_f64().unwrap();
        assert!(
            ((loss - expected) / expected).abs() <= 1e-5,
            "{name}: loss {loss} vs {expected}"
        );
        eprintln!("pipeline {name}: inputs equal; loss {loss:.6} vs {expected:.6}");
    }
    // Two samples of different lengths and tile counts (1 tile, 2×2) in one padded batch.
    let names = ["image", "tiles"];
    let batch = encode(fx, &names);
    assert_same_inputs(fx, "batch", &batch);
    let lengths: Vec<i64> =
        Vec::try_from(fx.reference["batch.attention_mask"].sum_dim_intlist(1, false, Kind::Int64))
            .unwrap();
    let loss = fx.meta["batch"]["loss"].as_f64().unwrap();
    check_model(fx, &model, "batch", &batch, loss, &lengths);
}

/// Errors that name what is wrong: more images than the model accepts, a placeholder count
/// that differs from the images, videos; an image too wide for any canvas still tiles (the
/// `wide` sample above equals transformers).
#[test]
fn bad_inputs_are_clear_errors() {
    let fx = fixture();
    let processor = Mllama::processor(&fx.config, &fx.dir, &Default::default()).unwrap();
    let image = fx.image("a");
    let many = vec![image.clone(); processor.max_images + 1];
    let err = processor.process(&many, &[]).unwrap_err().to_string();
    assert!(
        err.contains("more than the") && err.contains(&format!("{} images", many.len())),
        "{err}"
    );
    let (media, tokens) = processor
        .process(std::slice::from_ref(&image), &[])
        .unwrap();
    let template = Mllama::template(&fx.config, &fx.dir).unwrap();
    let conv = conversation_from_messages(&fx.meta["samples"]["two_images"]["messages"]);
    let err = format!("{:#}", template.encode(&conv, &tokens, false).unwrap_err());
    assert!(err.contains("placeholder"), "{err}");
    // A sample whose ids hold one <|image|> too many reaches the collator as an error too.
    let conv = conversation_from_messages(&fx.meta["samples"]["image"]["messages"]);
    let mut text = template.encode(&conv, &tokens, false).unwrap();
    text.input_ids.insert(1, fx.config.image_token_id);
    text.labels.insert(1, -100);
    let err = Mllama::collator(&fx.config)
        .collate(vec![Mllama::sample(text, media)], Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("batch sample 0: 2 <|image|> token(s) for 1 image(s)"),
        "{err}"
    );
    let clip = lmms_ft_core::data::VideoClip {
        frames: vec![image],
        sampled_fps: 1.0,
    };
    let err = processor.process(&[], &[clip]).unwrap_err().to_string();
    assert!(err.contains("images only"), "{err}");
}

/// Greedy generation through the family contract against transformers'
/// `generate(do_sample=False)`: reply tokens, per-step logits, cached vs uncached and batched
/// vs one by one ([`lmms_ft_core::testing::generation::check_generation`]).
#[test]
fn greedy_generation_matches_transformers() {
    use lmms_ft_core::testing::generation::{check_generation, GenerationCase, TOLERANCE};
    let fx = fixture();
    let cases: Vec<GenerationCase> = ["text", "image", "tiles", "two_images"]
        .into_iter()
        .map(|name| {
            let mut conversation =
                conversation_from_messages(&fx.meta["samples"][name]["messages"]);
            conversation.turns.pop();
            GenerationCase {
                name: name.to_string(),
                conv: PreparedConversation {
                    conversation,
                    media: DecodedMedia {
                        images: fx.images_of(name),
                        ..Default::default()
                    },
                },
                prompt_ids: Some(
                    Vec::try_from(&fx.reference[&format!("{name}.prompt_ids")]).unwrap(),
                ),
                generated: Vec::try_from(&fx.reference[&format!("{name}.generated")]).unwrap(),
                step_logits: fx.reference[&format!("{name}.generated_logits")].shallow_clone(),
                logit_tolerance: TOLERANCE,
            }
        })
        .collect();
    check_generation::<Mllama>(&fx.dir, &cases, 8);
}

/// bf16 weights and compute stay close to fp32 (bf16 has ~3 significant digits), and a
/// checkpoint of another model is refused naming the mismatch.
#[test]
fn bf16_and_wrong_checkpoint() {
    let fx = fixture();
    let batch = fx.batch("two_images", "labels");
    let bf16 = MllamaModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::BFloat16).unwrap();
    let logits = tch::no_grad(|| bf16.logits(&batch)).unwrap();
    assert_eq!(logits.kind(), Kind::BFloat16);
    let d = max_abs_diff(&logits, &fx.reference["two_images.logits"]);
    assert!(d < 0.05, "bf16 logits differ from fp32 by {d}");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.dir.join("config.json")).unwrap())
            .unwrap();
    json["text_config"]["cross_attention_layers"] = serde_json::json!([2]);
    let other = lmms_ft_mllama::config::MllamaConfig::from_hf_json(&json).unwrap();
    let err = MllamaModel::load(&other, &fx.dir, Device::Cpu, Kind::Float)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("another model"), "{err}");
}
