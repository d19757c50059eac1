//! `lmms-ft evaluate` and `validate-data` end to end on a tiny Qwen2.5-VL checkpoint saved by
//! transformers: per-sample losses under the label rule equal the oracle's, and a dataset
//! seeded with defects is reported record by record.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use lmms_ft_core::testing::{assert_evaluate_report, cached_fixture};

mod support;
use support::llava_record;

/// The fixture checkpoint (cached across test binaries and runs).
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_fixture("qwen2_vl_fixture.py", "qwen2_5_vl").0)
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
    assert_evaluate_report(dir, &out, &names, "qwen2.5-vl");
}

#[test]
fn validate_data_reports_every_defect_with_its_location() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture();
    std::fs::copy(dir.join("image_a.png"), tmp.path().join("ok.png")).unwrap();
    std::fs::write(
        tmp.path().join("broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    let long: String = (0..300).map(|i| format!("w{i} ")).collect();
    let lines = [
        r#"{"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Noise."}], "image": "ok.png"}"#.to_string(),
        r#"{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]"#.to_string(),
        r#"{"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "?"}], "image": "missing.png"}"#.to_string(),
        r#"{"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "?"}], "image": "broken.png"}"#.to_string(),
        r#"{"conversations": [{"from": "human", "value": "<image><image>\nBoth?"}, {"from": "gpt", "value": "?"}], "image": "ok.png"}"#.to_string(),
        r#"{"conversations": [{"from": "gpt", "value": "I start."}, {"from": "human", "value": "Odd."}]}"#.to_string(),
        r#"{"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "Empty question."}]}"#.to_string(),
        format!(r#"{{"conversations": [{{"from": "human", "value": "{long}"}}, {{"from": "gpt", "value": "Long."}}]}}"#),
    ];
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let args = |file: &Path| {
        vec![
            "validate-data".to_string(),
            "--model-path".into(),
            dir.to_str().unwrap().into(),
            "--data".into(),
            file.to_str().unwrap().into(),
            "--set".into(),
            "data.max_length=200".into(),
        ]
    };
    let out = Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args(args(&data))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let report = String::from_utf8_lossy(&out.stdout);
    // One problem per defective line, each located at its line (1-based).
    for (line, words) in [
        (2, "json"),
        (3, "missing.png"),
        (4, "broken.png"),
        (5, "placeholder"),
        (6, "role"),
        (7, "empty"),
        (8, "200"),
    ] {
        let hit = report
            .lines()
            .any(|l| l.contains(&format!("data.jsonl:{line}")) && l.to_lowercase().contains(words));
        assert!(hit, "line {line} ({words}) not reported:\n{report}");
    }
    assert!(
        !report
            .lines()
            .any(|l| l.contains("data.jsonl:1 ") || l.contains("data.jsonl:1:")),
        "{report}"
    );

    let clean = tmp.path().join("clean.jsonl");
    std::fs::write(&clean, &lines[0]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args(args(&clean))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
