//! `evaluate --adapter` (LoRA applied on the fly, no merge) equals `evaluate` on the merged
//! model, per sample (≤ 1e-5 relative), on the tiny LLaVA-1.5 fixture
//! (`scripts/oracle/llava_fixture.py`), for:
//!
//! - an adapter written by `peft` itself (`scripts/oracle/peft_adapter.py`; random lora_B
//!   on the text q/v projections and the projector), against the model `peft` merged, in
//!   the transformers 5 key layout and keyed as older tools wrote it
//!   (`base_model.model.model.layers.*`);
//! - an adapter lmms-ft trained, against `lmms-ft merge-lora`.
//!
//! Each adapter must also move the loss away from the base model's, or the check would show
//! nothing. `generate --adapter` gives the merged model's tokens too.

use std::path::Path;

use lmms_ft_core::testing::{cached_fixture, run_oracle};

mod support;
use support::{assert_ok, llava_record, lmms_ft, train_args};

/// The fixture's three samples as a LLaVA-format dataset.
fn dataset(fixture: &Path, dir: &Path) -> std::path::PathBuf {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("reference.json")).unwrap())
            .unwrap();
    let records: Vec<serde_json::Value> = [
        ("text", vec![]),
        ("image", vec!["image_b.png"]),
        ("two_images", vec!["image_a.png", "image_b.png"]),
    ]
    .iter()
    .map(|(name, images)| llava_record(&meta["samples"][name]["messages"], images))
    .collect();
    let path = dir.join("data.json");
    std::fs::write(&path, serde_json::to_string(&records).unwrap()).unwrap();
    path
}

/// Per-sample losses of `evaluate` on `model` (with `adapter`).
fn losses(model: &Path, adapter: Option<&Path>, data: &Path, images: &Path) -> Vec<f64> {
    let mut args = vec![
        "evaluate".to_string(),
        "--model-path".into(),
        model.to_str().unwrap().into(),
        "--data".into(),
        data.to_str().unwrap().into(),
        "--image-folder".into(),
        images.to_str().unwrap().into(),
    ];
    if let Some(adapter) = adapter {
        args.extend(["--adapter".into(), adapter.to_str().unwrap().into()]);
    }
    let out = lmms_ft(&args);
    assert_ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["loss"].as_f64().unwrap())
        .collect()
}

fn assert_close(ours: &[f64], merged: &[f64], base: &[f64], what: &str) {
    assert_eq!(ours.len(), 3, "{what}");
    for (i, ((a, m), b)) in ours.iter().zip(merged).zip(base).enumerate() {
        assert!(
            ((a - m) / m).abs() <= 1e-5,
            "{what}: sample {i}: with adapter {a}, merged {m}"
        );
        assert!(
            ((b - m) / m).abs() > 1e-3,
            "{what}: sample {i}: the adapter barely changes the loss ({b} vs {m})"
        );
    }
    eprintln!("{what}: adapter {ours:?} = merged {merged:?} (base {base:?})");
}

fn generated(model: &Path, adapter: Option<&Path>, image: &Path) -> serde_json::Value {
    let mut args = vec![
        "generate".to_string(),
        "--model-path".into(),
        model.to_str().unwrap().into(),
        "--image".into(),
        image.to_str().unwrap().into(),
        "--prompt".into(),
        "Describe it.".into(),
        "--max-new-tokens".into(),
        "6".into(),
        "--json".into(),
    ];
    if let Some(adapter) = adapter {
        args.extend(["--adapter".into(), adapter.to_str().unwrap().into()]);
    }
    let out = lmms_ft(&args);
    assert_ok(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn evaluate_with_a_peft_adapter_equals_the_peft_merged_model() {
    let (fixture, _) = cached_fixture("llava_fixture.py", "llava");
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&fixture, tmp.path());
    let out = tmp.path().join("peft");
    run_oracle(
        "peft_adapter.py",
        &[fixture.to_str().unwrap(), out.to_str().unwrap()],
    );
    let base = losses(&fixture, None, &data, &fixture);
    let merged = losses(&out.join("merged"), None, &data, &fixture);
    for layout in ["adapter", "adapter_old"] {
        let ours = losses(&fixture, Some(&out.join(layout)), &data, &fixture);
        assert_close(&ours, &merged, &base, &format!("peft {layout}"));
    }
    let image = fixture.join("image_b.png");
    let with_adapter = generated(&fixture, Some(&out.join("adapter")), &image);
    let on_merged = generated(&out.join("merged"), None, &image);
    assert_eq!(with_adapter["token_ids"], on_merged["token_ids"]);
}

#[test]
fn evaluate_with_an_lmms_ft_adapter_equals_merge_lora() {
    let (fixture, _) = cached_fixture("llava_fixture.py", "llava");
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&fixture, tmp.path());
    let trained = tmp.path().join("trained");
    assert_ok(&lmms_ft(&train_args(
        &fixture,
        &data,
        &trained,
        &[
            "train.max_steps=3",
            "train.batch_size=1",
            "train.learning_rate=2e-2",
            "lora.r=4",
            "train.eval_steps=3",
            "train.eval_generate_samples=2",
            "train.eval_max_new_tokens=4",
            &format!("data.eval={}", data.display()),
        ],
    )));
    assert!(trained.join("adapter_model.safetensors").is_file());
    check_eval_generation(&fixture, &trained, &data, tmp.path());
    let merged = tmp.path().join("merged");
    assert_ok(&lmms_ft(&[
        "merge-lora",
        "--base",
        fixture.to_str().unwrap(),
        "--adapter",
        trained.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]));
    let base = losses(&fixture, None, &data, &fixture);
    let ours = losses(&fixture, Some(&trained), &data, &fixture);
    let merged = losses(&merged, None, &data, &fixture);
    assert_close(&ours, &merged, &base, "lmms-ft adapter");
}

/// The answers generated at the last evaluation of training (step 3, the final adapter)
/// score what `evaluate --generate --adapter` gives on the same two samples, and the loss
/// plot draws the metric.
fn check_eval_generation(fixture: &Path, trained: &Path, data: &Path, tmp: &Path) {
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(trained.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let gen: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r.get("eval_rouge_l").is_some())
        .collect();
    assert_eq!(gen.len(), 1, "{rows:?}");
    assert_eq!(gen[0]["step"], 3);
    assert_eq!(gen[0]["eval_generated"], 2);
    assert!(rows
        .iter()
        .any(|r| r["step"] == 3 && r.get("eval_loss").is_some()));

    let records: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(data).unwrap()).unwrap();
    let two = tmp.join("two.json");
    std::fs::write(&two, serde_json::to_string(&records[..2]).unwrap()).unwrap();
    let json = tmp.join("two-eval.json");
    assert_ok(&lmms_ft(&[
        "evaluate",
        "--model-path",
        fixture.to_str().unwrap(),
        "--adapter",
        trained.to_str().unwrap(),
        "--data",
        two.to_str().unwrap(),
        "--image-folder",
        fixture.to_str().unwrap(),
        "--generate",
        "--max-new-tokens",
        "4",
        "--json",
        json.to_str().unwrap(),
    ]));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in ["exact_match", "token_f1", "rouge_l"] {
        let during = gen[0][format!("eval_{key}")].as_f64().unwrap();
        let after = report["generation"][key].as_f64().unwrap();
        assert!(
            (during - after).abs() < 1e-12,
            "{key}: {during} in training, {after} after"
        );
    }
    let png = image::open(trained.join("loss.png")).unwrap().to_rgb8();
    let green = png
        .pixels()
        .filter(|p| p[1] > 120 && p[0] < 40 && p[2] < 90)
        .count();
    assert!(
        green > 20,
        "the generation metric is not drawn ({green} pixels)"
    );
}
