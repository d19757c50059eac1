//! `lmms-ft evaluate` end to end on the tiny Qwen3-VL checkpoint saved by transformers
//! (`scripts/oracle/qwen3_vl_fixture.py`): per-sample losses under the label rule and label
//! counts equal the oracle's for a text, a one-image and a two-image multi-turn sample (with
//! a system prompt); `list-models` reports the family as implemented; and the commands run
//! end to end: `validate-data`, a QLoRA `train` (loss logged, PEFT adapter written),
//! `merge-lora`, and `generate` with an image and with an MPEG-4 video (decoded, sampled at
//! 2 fps, timestamped and resized as one clip).

mod support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lmms_ft_core::testing::{cached_fixture, write_test_video};
use support::{assert_evaluate_matches_fixture, assert_ok, image_dataset, lmms_ft, train_args};

/// The fixture checkpoint (cached across test binaries and runs).
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_fixture("qwen3_vl_fixture.py", "qwen3_vl").0)
}

#[test]
fn evaluate_matches_transformers_per_sample() {
    let samples = [
        ("text", vec![]),
        ("image", vec!["image_a.png"]),
        ("two_images", vec!["image_a.png", "image_b.png"]),
    ];
    assert_evaluate_matches_fixture(fixture(), &samples, "qwen3-vl");
}

#[test]
fn list_models_reports_qwen3_vl_implemented() {
    let out = lmms_ft(&["list-models", "--json"]);
    assert!(out.status.success());
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let ours: Vec<&serde_json::Value> = rows.iter().filter(|r| r["family"] == "qwen3-vl").collect();
    assert_eq!(ours.len(), 8, "2B / 4B / 8B / 32B, Instruct and Thinking");
    for row in ours {
        assert_eq!(row["status"], "implemented", "{row}");
    }
}

#[test]
fn validate_qlora_train_merge_and_generate_run_end_to_end() {
    let dir = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let data = image_dataset(tmp.path());
    let run = lmms_ft(&[
        "validate-data",
        "--model-path",
        dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--image-folder",
        dir.to_str().unwrap(),
    ]);
    assert_ok(&run);

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
        stderr.contains("quantised 14 linear layers"),
        "the 14 LLM linears are not reported quantised:\n{stderr}"
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

    let video = tmp.path().join("clip.mp4");
    write_test_video(&video, 8, (64, 48), 4, true, &|i| {
        [(40 * i) as u8, 128, 255 - (30 * i) as u8]
    });
    for media in [
        ["--image", dir.join("image_b.png").to_str().unwrap()],
        ["--video", video.to_str().unwrap()],
    ] {
        let mut args = vec![
            "generate",
            "--model-path",
            merged.to_str().unwrap(),
            "--prompt",
            "What is this?",
            "--set",
            "train.device=cpu",
            "--max-new-tokens",
            "4",
            "--json",
        ];
        args.extend(media);
        let run = lmms_ft(&args);
        assert_ok(&run);
        let reply: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        let n = reply["token_ids"].as_array().unwrap().len();
        assert!(
            n == 4 || (n < 4 && reply["stopped"] == true),
            "{media:?}: {reply}"
        );
    }
}
