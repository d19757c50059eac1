//! `lmms-ft evaluate` on the committed Phi-3-V fixture (`tests/data/phi3v`, references from
//! the Hub's remote code): per-sample losses under the label rule, label counts and the
//! token-weighted mean equal the Hub code run per sample, for a text, a one-image, an
//! all-crops and a two-image two-turn sample in one batch of four. A record whose
//! `<|image_N|>` names a missing image fails with an error naming the record and the tag.

use std::process::Command;

use lmms_ft_core::testing::{assert_evaluate_report, llava_record, repo_root};

fn fixture() -> (std::path::PathBuf, serde_json::Value) {
    let dir = repo_root().join("tests/data/phi3v");
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
        .unwrap();
    (dir, meta)
}

fn evaluate(
    dir: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args([
            "evaluate",
            "--model-path",
            dir.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--image-folder",
            dir.to_str().unwrap(),
            "--set",
            "train.batch_size=4",
            "--json",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap()
}

#[test]
fn evaluate_phi3_v_matches_the_hub_code() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, meta) = fixture();
    let names = ["text", "image", "large", "two_images"];
    let records: Vec<serde_json::Value> = names
        .iter()
        .map(|name| {
            let images: Vec<&str> = meta["samples"][name]["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            llava_record(&meta["samples"][name]["messages"], &images)
        })
        .collect();
    let data = tmp.path().join("data.json");
    std::fs::write(&data, serde_json::to_string_pretty(&records).unwrap()).unwrap();
    let out = tmp.path().join("eval.json");
    let run = evaluate(&dir, &data, &out);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_evaluate_report(&dir, &out, &names, "phi3-v");
}

#[test]
fn a_tag_naming_a_missing_image_is_an_error_naming_the_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = fixture();
    let records = serde_json::json!([
        {"image": "image_a.png", "conversations": [
            {"from": "human", "value": "<|image_1|>\nWhat is it?"},
            {"from": "gpt", "value": "Waves."}]},
        {"image": "image_a.png", "conversations": [
            {"from": "human", "value": "<|image_2|>\nAnd this?"},
            {"from": "gpt", "value": "Nothing."}]}
    ]);
    let data = tmp.path().join("data.json");
    std::fs::write(&data, records.to_string()).unwrap();
    let run = evaluate(&dir, &data, &tmp.path().join("eval.json"));
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("<|image_2|> names image 2 but the sample has 1 image(s)"),
        "{err}"
    );
    assert!(
        err.contains("data.json"),
        "the error names no sample: {err}"
    );
    eprintln!("{err}");
}
