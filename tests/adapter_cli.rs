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

use lmms_ft_core::testing::{cached_fixture, llava_record, run_oracle};

mod support;
use support::{assert_ok, lmms_ft, train_args};

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
        ],
    )));
    assert!(trained.join("adapter_model.safetensors").is_file());
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
