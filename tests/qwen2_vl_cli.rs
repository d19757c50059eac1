//! `lmms-ft evaluate` and `validate-data` end to end on a tiny Qwen2.5-VL checkpoint saved by
//! transformers: per-sample losses under the label rule equal the oracle's, and a dataset
//! seeded with defects is reported record by record.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lmms_ft_core::testing::cached_fixture;

mod support;
use support::{assert_evaluate_matches_fixture, lmms_ft};

/// The fixture checkpoint (cached across test binaries and runs).
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_fixture("qwen2_vl_fixture.py", "qwen2_5_vl").0)
}

#[test]
fn evaluate_matches_transformers_per_sample() {
    let samples = [
        ("text", vec![]),
        ("image", vec!["image_a.png"]),
        ("two_images", vec!["image_a.png", "image_b.png"]),
    ];
    assert_evaluate_matches_fixture(fixture(), &samples, "qwen2.5-vl");
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
    let out = lmms_ft(&args(&data));
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
    let out = lmms_ft(&args(&clean));
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
