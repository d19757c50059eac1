//! What the binary's end-to-end training tests share: running `lmms-ft` and the arguments of
//! a `train` run on a fixture checkpoint.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

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
