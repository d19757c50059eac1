//! `lmms-ft evaluate` end to end on tiny LLaVA checkpoints saved by transformers
//! (`scripts/oracle/llava_fixture.py`): LLaVA-1.5 (pad-to-square, Vicuna training template),
//! LLaVA-NeXT with Mistral text (anyres, Hub template), LLaVA-NeXT-Video (registered as its
//! own family; Vicuna training template with `<video>`) and LLaVA-OneVision (anyres_max, one
//! tile per image of the two-image sample). Per-sample losses under the label rule, their
//! label counts and the token-weighted mean equal the oracle's.

use std::collections::HashMap;
use std::process::Command;

use lmms_ft_core::testing::{hf_configs, llava_record, run_oracle};
use tch::Tensor;

fn check_evaluate(variant: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    run_oracle(
        "llava_fixture.py",
        &[
            dir.to_str().unwrap(),
            variant,
            hf_configs().to_str().unwrap(),
        ],
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let reference: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let samples = [
        ("text", vec![]),
        ("image", vec!["image_b.png"]),
        ("two_images", vec!["image_a.png", "image_b.png"]),
    ];
    let records: Vec<serde_json::Value> = samples
        .iter()
        .map(|(name, images)| llava_record(&meta["samples"][name]["messages"], images))
        .collect();
    let data = tmp.path().join("data.json");
    std::fs::write(&data, serde_json::to_string_pretty(&records).unwrap()).unwrap();
    let out = tmp.path().join("eval.json");
    let run = Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args([
            "evaluate",
            "--model-path",
            dir.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--image-folder",
            dir.to_str().unwrap(),
            "--json",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{variant}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let (mut weighted, mut tokens) = (0.0, 0i64);
    for (i, (name, _)) in samples.iter().enumerate() {
        let row = &report["samples"][i];
        assert_eq!(row["index"], i);
        let expected = meta["samples"][name]["rule_loss"].as_f64().unwrap();
        let loss = row["loss"].as_f64().unwrap();
        assert!(
            ((loss - expected) / expected).abs() <= 1e-5,
            "{variant}/{name}: {loss} vs {expected}"
        );
        // Labeled positions after the causal shift, counted from the oracle's labels.
        let labels: Vec<i64> =
            Vec::try_from(reference[&format!("{name}.rule_labels")].flatten(0, -1)).unwrap();
        let n = labels.iter().skip(1).filter(|&&l| l != -100).count() as i64;
        assert_eq!(row["num_label_tokens"], n, "{variant}/{name}");
        weighted += expected * n as f64;
        tokens += n;
    }
    let mean = report["mean_loss"].as_f64().unwrap();
    assert!(
        (mean - weighted / tokens as f64).abs() <= 1e-5 * mean,
        "{variant}: mean {mean}"
    );
}

#[test]
fn evaluate_llava_1_5_matches_transformers() {
    check_evaluate("llava");
}

#[test]
fn evaluate_llava_next_mistral_matches_transformers() {
    check_evaluate("next_mistral");
}

#[test]
fn evaluate_llava_next_video_matches_transformers() {
    check_evaluate("next_video");
}

#[test]
fn evaluate_llava_onevision_matches_transformers() {
    check_evaluate("onevision");
}
