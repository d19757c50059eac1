//! `lmms-ft evaluate` end to end on the tiny Qwen3-VL checkpoint saved by transformers
//! (`scripts/oracle/qwen3_vl_fixture.py`): per-sample losses under the label rule and label
//! counts equal the oracle's for a text, a one-image and a two-image multi-turn sample (with
//! a system prompt), and `list-models` reports the family as implemented.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use lmms_ft_core::testing::{assert_evaluate_report, cached_fixture, llava_record};

/// The fixture checkpoint (cached across test binaries and runs).
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_fixture("qwen3_vl_fixture.py", "qwen3_vl").0)
}

fn lmms_ft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn evaluate_matches_transformers_per_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let samples = [
        ("text", vec![]),
        ("image", vec!["image_a.png"]),
        ("two_images", vec!["image_a.png", "image_b.png"]),
    ];
    let records: Vec<serde_json::Value> = samples
        .iter()
        .map(|(name, images)| llava_record(&meta["samples"][name]["messages"], images))
        .collect();
    let data = tmp.path().join("data.json");
    std::fs::write(&data, serde_json::to_string_pretty(&records).unwrap()).unwrap();
    let out = tmp.path().join("eval.json");
    let run = lmms_ft(&[
        "evaluate",
        "--model-path",
        dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--image-folder",
        dir.to_str().unwrap(),
        "--json",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let names: Vec<&str> = samples.iter().map(|(name, _)| *name).collect();
    assert_evaluate_report(dir, &out, &names, "qwen3-vl");
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
