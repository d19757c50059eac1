//! `lmms-ft evaluate` end to end on the tiny Llama-3.2-Vision checkpoint saved by
//! transformers (`scripts/oracle/mllama_fixture.py`): per-sample losses under the label rule
//! equal the oracle's for text-only, one-image, 2×2-tile, two-image and too-wide samples;
//! `generate` answers with the cached decode transformers' greedy `generate` gives; a QLoRA
//! `train` (the cross-attention linears quantised too), `merge-lora` and `generate` on the
//! merged model run end to end; `validate-data` names samples with bad images.

mod support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lmms_ft_core::testing::cached_fixture;
use support::{assert_evaluate_matches_fixture, assert_ok, image_dataset, lmms_ft, train_args};

fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_fixture("mllama_fixture.py", "tiny").0)
}

#[test]
fn evaluate_matches_transformers_per_sample() {
    let dir = fixture();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    // The fixture names each sample's images by key (`image_<key>.png`).
    let images: Vec<(&str, Vec<String>)> = ["text", "image", "tiles", "two_images", "wide"]
        .into_iter()
        .map(|name| {
            let files = meta["samples"][name]["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| format!("image_{}.png", k.as_str().unwrap()))
                .collect();
            (name, files)
        })
        .collect();
    let samples: Vec<(&str, Vec<&str>)> = images
        .iter()
        .map(|(name, files)| (*name, files.iter().map(String::as_str).collect()))
        .collect();
    assert_evaluate_matches_fixture(dir, &samples, "llama-3.2-vision");
}

#[test]
fn generate_answers_as_transformers_greedy_decode() {
    let dir = fixture();
    let reference: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(dir.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let run = lmms_ft(&[
        "generate",
        "--model-path",
        dir.to_str().unwrap(),
        "--image",
        dir.join("image_a.png").to_str().unwrap(),
        "--prompt",
        "Describe it.",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let printed = String::from_utf8_lossy(&run.stdout);
    let reply: serde_json::Value = serde_json::from_str(printed.trim()).unwrap();
    let expected: Vec<i64> = Vec::try_from(&reference["image.generated"]).unwrap();
    let ids: Vec<i64> = reply["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no token_ids in {reply}"))
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(ids, expected, "{reply}");
}

/// `validate-data` with the real tokenizer and processor: more images than a sample may
/// hold and an `<image>` count that differs from the images are reported at their line; an
/// image too wide for any canvas is fine (it tiles, as in transformers).
#[test]
fn validate_data_names_samples_with_bad_images() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture();
    for k in ["a", "wide"] {
        std::fs::copy(
            dir.join(format!("image_{k}.png")),
            tmp.path().join(format!("{k}.png")),
        )
        .unwrap();
    }
    let many: Vec<&str> = vec!["a.png"; 9];
    let lines = [
        r#"{"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Noise."}], "image": "wide.png"}"#.to_string(),
        serde_json::json!({
            "conversations": [
                {"from": "human", "value": format!("{}Which?", "<image>".repeat(9))},
                {"from": "gpt", "value": "All."}
            ],
            "image": many,
        })
        .to_string(),
        r#"{"conversations": [{"from": "human", "value": "<image><image>\nBoth?"}, {"from": "gpt", "value": "?"}], "image": "a.png"}"#.to_string(),
    ];
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = lmms_ft(&[
        "validate-data",
        "--model-path",
        dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--image-folder",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let report = String::from_utf8_lossy(&out.stdout);
    for (line, words) in [(2, "9 images, more than the 8"), (3, "placeholder")] {
        let hit = report
            .lines()
            .any(|l| l.contains(&format!("data.jsonl:{line}")) && l.contains(words));
        assert!(hit, "line {line} ({words}) not reported:\n{report}");
    }
    assert!(
        !report.lines().any(|l| l.contains("data.jsonl:1")),
        "the wide image is not a problem:\n{report}"
    );
}

#[test]
fn qlora_train_merge_and_generate_run_end_to_end() {
    let dir = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let data = image_dataset(tmp.path());
    let out = tmp.path().join("qlora");
    let run = lmms_ft(&train_args(
        dir,
        &data,
        &out,
        &[
            "train.mode=\"qlora\"",
            "train.max_steps=3",
            "train.learning_rate=1e-2",
            "lora.r=4",
        ],
    ));
    assert_ok(&run);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("quantised 21 linear layers"),
        "the 21 LLM linears (3 layers × 7, cross-attention included) are not reported quantised:\n{stderr}"
    );
    assert!(out.join("adapter_model.safetensors").is_file());
    let merged = tmp.path().join("merged");
    let run = lmms_ft(&[
        "merge-lora",
        "--base",
        dir.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert_ok(&run);
    let run = lmms_ft(&[
        "generate",
        "--model-path",
        merged.to_str().unwrap(),
        "--image",
        dir.join("image_b.png").to_str().unwrap(),
        "--prompt",
        "What is this?",
        "--set",
        "train.device=cpu",
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    assert_ok(&run);
    let reply: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let n = reply["token_ids"].as_array().unwrap().len();
    assert!(n == 4 || (n < 4 && reply["stopped"] == true), "{reply}");
}
