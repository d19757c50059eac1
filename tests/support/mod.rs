//! What the binary's end-to-end tests share: running `lmms-ft`, the arguments of a `train`
//! run on a fixture checkpoint, and dataset records. Not every binary that includes this
//! module uses every helper.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

pub fn lmms_ft<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args(args)
        .output()
        .unwrap()
}

pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `train` on the checkpoint in `model` (which also holds the images), on CPU, logging every
/// step, with `sets` as `--set` overrides.
pub fn train_args(model: &Path, data: &Path, out: &Path, sets: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--model-path",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--image-folder",
        model.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for s in ["train.device=cpu", "train.logging_steps=1"]
        .iter()
        .chain(sets)
    {
        args.push("--set".into());
        args.push(s.to_string());
    }
    args
}

/// `dir/train.json`: six LLaVA-format samples alternating the fixture's two images, for runs
/// whose outcome, not their data, is under test.
pub fn image_dataset(dir: &Path) -> PathBuf {
    let records: Vec<Value> = (0..6)
        .map(|i| {
            let (image, answer) = match i % 2 {
                0 => ("image_a.png", "It is mostly red."),
                _ => ("image_b.png", "Blue and green stripes."),
            };
            json!({"image": image, "conversations": [
                {"from": "human", "value": format!("<image>\nWhat is in picture {i}?")},
                {"from": "gpt", "value": answer},
            ]})
        })
        .collect();
    let path = dir.join("train.json");
    std::fs::write(&path, serde_json::to_string(&records).unwrap()).unwrap();
    path
}

/// Oracle chat messages (`[{role, content: [{type, text}]}]`) as a LLaVA-format dataset
/// record (`conversations` with `<image>` placeholders), the format the CLI tests train on.
pub fn llava_record(messages: &serde_json::Value, images: &[&str]) -> serde_json::Value {
    let mut record = serde_json::json!({ "conversations": [] });
    for m in messages.as_array().expect("messages is a list") {
        let text: String = m["content"]
            .as_array()
            .expect("content is a list")
            .iter()
            .map(|p| match p["type"].as_str() {
                Some("image") => "<image>".to_string(),
                _ => p["text"].as_str().unwrap_or_default().to_string(),
            })
            .collect();
        match m["role"].as_str() {
            Some("system") => record["system_prompt"] = text.into(),
            role => {
                let from = if role == Some("user") { "human" } else { "gpt" };
                record["conversations"]
                    .as_array_mut()
                    .expect("just made")
                    .push(serde_json::json!({"from": from, "value": text}));
            }
        }
    }
    if !images.is_empty() {
        record["image"] = serde_json::json!(images);
    }
    record
}

/// Runs `lmms-ft evaluate` on the oracle fixture in `dir` over the named samples of its
/// `reference.json` (each with the fixture images it shows) and checks the report per sample
/// against the oracle's losses and label counts: the one evaluate check every family's CLI
/// test makes.
pub fn assert_evaluate_matches_fixture(dir: &Path, samples: &[(&str, Vec<&str>)], what: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let records: Vec<Value> = samples
        .iter()
        .map(|(name, images)| llava_record(&meta["samples"][name]["messages"], images))
        .collect();
    let data = tmp.path().join("data.json");
    std::fs::write(&data, serde_json::to_string_pretty(&records).unwrap()).unwrap();
    let out = tmp.path().join("eval.json");
    let dir_s = dir.to_str().unwrap();
    assert_ok(&lmms_ft(&[
        "evaluate",
        "--model-path",
        dir_s,
        "--data",
        data.to_str().unwrap(),
        "--image-folder",
        dir_s,
        "--report",
        out.to_str().unwrap(),
    ]));
    let names: Vec<&str> = samples.iter().map(|(name, _)| *name).collect();
    lmms_ft_core::testing::assert_evaluate_report(dir, &out, &names, what);
}
