//! `lmms-ft evaluate` end to end on the tiny Llama-3.2-Vision checkpoint saved by
//! transformers (`scripts/oracle/mllama_fixture.py`): per-sample losses under the label rule
//! equal the oracle's for text-only, one-image, 2×2-tile, two-image and too-wide samples, and
//! `generate` answers with the cached decode transformers' greedy `generate` gives.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use lmms_ft_core::testing::{assert_evaluate_report, cached_fixture, llava_record};

fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_fixture("mllama_fixture.py", "tiny").0)
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
    let names = ["text", "image", "tiles", "two_images", "wide"];
    let records: Vec<serde_json::Value> = names
        .iter()
        .map(|name| {
            let images: Vec<String> = meta["samples"][name]["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| format!("image_{}.png", k.as_str().unwrap()))
                .collect();
            let images: Vec<&str> = images.iter().map(String::as_str).collect();
            llava_record(&meta["samples"][name]["messages"], &images)
        })
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
    assert_evaluate_report(dir, &out, &names, "llama-3.2-vision");
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
