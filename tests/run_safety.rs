//! A run is never lost or mixed with another, through the `lmms-ft` binary on the tiny
//! Qwen2-VL fixture. One uninterrupted 6-step LoRA run (checkpoints 2, 4, 6; dropout on, so
//! the RNG matters) is the reference the others copy or must end equal to, bit for bit:
//!
//! - a new run refuses a directory holding another run, naming what is there, and
//!   `--overwrite` replaces that run (checkpoints included) but not the user's own files;
//! - `--resume` refuses a Qwen2-VL run's checkpoint on a Qwen2.5-VL model, and one whose
//!   trainable layout differs, and warns (naming the keys) about a changed learning rate
//!   or dataset;
//! - a checkpoint with a truncated or altered file is refused naming the file, and plain
//!   `--resume` falls back to the newest intact checkpoint and ends equal to the reference;
//! - a disk that fills during a save (a small tmpfs where mounting is allowed, else the
//!   save path's `LMMS_FT_TEST_DISK_BYTES`) keeps the previous checkpoint, removes the
//!   partial `.tmp`, says how much space was needed, and the run resumes to the reference;
//! - SIGKILL inside a save (held there by `LMMS_FT_TEST_STALL_SAVE`, the marker-file
//!   mechanism of `adapters/qwen2-vl/tests/train_resume.rs`) followed by `--resume` ends
//!   equal to the reference.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lmms_ft_core::peft::io::read_safetensors;
use lmms_ft_core::testing::{cached_fixture, max_abs_diff};
use lmms_ft_core::train::integrity::{self, DISK_BYTES_ENV, STALLED_MARKER, STALL_SAVE_ENV};
use lmms_ft_core::train::{checkpoint, metrics::read_rows};
use serde_json::Value;
use support::{assert_ok, lmms_ft};
use tch::Tensor;

const SETS: [&str; 7] = [
    "train.max_steps=6",
    "train.batch_size=2",
    "train.learning_rate=5e-3",
    "train.save_steps=2",
    "lora.r=4",
    "lora.dropout=0.1",
    "train.dataloader_workers=1",
];

/// The tiny Qwen2-VL checkpoint of `scripts/oracle/qwen2_vl_fixture.py` (with the images the
/// dataset names).
fn qwen2_vl() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_fixture("qwen2_vl_fixture.py", "qwen2_vl").0)
}

/// `train` of `model` on the shared dataset into `out` (images from the Qwen2-VL fixture).
fn args(model: &Path, out: &Path, extra_sets: &[&str], flags: &[&str]) -> Vec<String> {
    let sets: Vec<&str> = SETS.iter().chain(extra_sets).copied().collect();
    let mut a = support::train_args(model, &reference().data, out, &sets);
    let i = a.iter().position(|x| x == "--image-folder").unwrap();
    a[i + 1] = qwen2_vl().display().to_string();
    a.extend(flags.iter().map(|s| s.to_string()));
    a
}

fn run(out: &Path, flags: &[&str]) -> Output {
    lmms_ft(&args(qwen2_vl(), out, &[], flags))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_fails_with(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "the run should have failed:\n{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` missing from:\n{err}");
    }
    err
}

struct Reference {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    out: PathBuf,
}

/// The uninterrupted run, made once for every test.
fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let data = support::image_dataset(tmp.path());
        let out = tmp.path().join("reference");
        let r = Reference {
            data,
            out: out.clone(),
            _tmp: tmp,
        };
        // `args` reads the dataset path through `reference()`, which is still being built.
        let sets: Vec<&str> = SETS.to_vec();
        let a = support::train_args(qwen2_vl(), &r.data, &out, &sets);
        assert_ok(&lmms_ft(&a));
        r
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn steps(dir: &Path) -> Vec<u64> {
    checkpoint::list(dir)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

fn losses(dir: &Path) -> Vec<(u64, f64)> {
    read_rows(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("loss")?.as_f64()?)))
        .collect()
}

fn adapter(dir: &Path) -> BTreeMap<String, Tensor> {
    read_safetensors(&dir.join("adapter_model.safetensors")).unwrap()
}

/// The adapter and every logged loss of `dir` equal the reference run's exactly.
fn assert_same_as_reference(dir: &Path) {
    let (a, b) = (adapter(dir), adapter(&reference().out));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, t) in &a {
        assert_eq!(max_abs_diff(t, &b[name]), 0.0, "{name} differs");
    }
    assert!(a.values().any(|t| t.abs().max().double_value(&[]) > 0.0));
    let la = losses(dir);
    assert_eq!(la.len(), 6);
    assert_eq!(la, losses(&reference().out), "logged losses differ");
}

#[test]
fn a_used_output_dir_is_refused_and_overwrite_replaces_the_old_run() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    copy_dir(&r.out, &out);
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let adapter_before = std::fs::read(out.join("adapter_model.safetensors")).unwrap();

    let refused = run(&out, &[]);
    assert_fails_with(
        &refused,
        &[
            "already holds another run",
            "adapter_model.safetensors",
            "metrics.jsonl (6 logged steps)",
            "checkpoint-2, checkpoint-4, checkpoint-6",
            "--overwrite",
            "--resume",
        ],
    );
    assert_eq!(
        losses(&out).len(),
        6,
        "the refused run touched metrics.jsonl"
    );
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        adapter_before
    );
    assert_eq!(steps(&out), vec![2, 4, 6]);

    let both = run(&out, &["--overwrite", "--resume"]);
    assert_fails_with(&both, &["--overwrite", "--resume"]);

    // A 2-step run without checkpoints replaces the 6-step one entirely.
    let replaced = lmms_ft(&args(
        qwen2_vl(),
        &out,
        &["train.max_steps=2", "train.save_steps=100"],
        &["--overwrite"],
    ));
    assert_ok(&replaced);
    assert!(stderr(&replaced).contains("removed the previous run"));
    assert_eq!(losses(&out).len(), 2);
    assert!(
        steps(&out).is_empty(),
        "old checkpoints kept: {:?}",
        steps(&out)
    );
    assert_ne!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        adapter_before
    );
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );

    // A directory holding a model (not an lmms-ft run) is never emptied, and the model
    // directory itself is not an output directory.
    // Both are refused before any weight is read, so a stand-in file will do.
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(qwen2_vl().join("config.json"), model.join("config.json")).unwrap();
    std::fs::write(model.join("model.safetensors"), b"weights").unwrap();
    let other = lmms_ft(&args(qwen2_vl(), &model, &[], &["--overwrite"]));
    assert_fails_with(&other, &["model weights lmms-ft did not write"]);
    assert!(model.join("model.safetensors").is_file());
    let itself = lmms_ft(&args(&model, &model, &[], &[]));
    assert_fails_with(&itself, &["is the model directory"]);
}

#[test]
fn resume_refuses_a_foreign_checkpoint_and_names_changed_settings() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    copy_dir(&r.out, &out);
    let (qwen25, _) = cached_fixture("qwen2_vl_fixture.py", "qwen2_5_vl");

    // The case: a Qwen2-VL checkpoint resumed into Qwen2.5-VL with another rate.
    let foreign = lmms_ft(&args(
        &qwen25,
        &out,
        &["train.learning_rate=1e-3", "train.max_steps=8"],
        &["--resume"],
    ));
    assert_fails_with(
        &foreign,
        &[
            "cannot resume from",
            "checkpoint-6",
            "base model",
            "--overwrite",
        ],
    );
    let other_layout = lmms_ft(&args(
        qwen2_vl(),
        &out,
        &["lora.r=8", "train.max_steps=8"],
        &["--resume"],
    ));
    assert_fails_with(&other_layout, &["trains other parameters", "lora_A"]);
    assert_eq!(
        losses(&out).len(),
        6,
        "a refused resume changed metrics.jsonl"
    );

    let changed = lmms_ft(&args(
        qwen2_vl(),
        &out,
        &["train.learning_rate=1e-3", "train.max_steps=8"],
        &["--resume"],
    ));
    assert_ok(&changed);
    let err = stderr(&changed);
    assert!(
        err.contains("differ from the run that wrote it")
            && err.contains("train.learning_rate: 0.005 → 0.001")
            && err.contains("train.max_steps: 6 → 8"),
        "{err}"
    );
    assert_eq!(losses(&out).len(), 8);

    // Another dataset (one more record): named, and the data position carried over.
    let mut records: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&r.data).unwrap()).unwrap();
    records.push(records[0].clone());
    let data7 = tmp.path().join("train7.json");
    std::fs::write(&data7, serde_json::to_string(&records).unwrap()).unwrap();
    let mut a = args(
        qwen2_vl(),
        &out,
        &["train.learning_rate=1e-3", "train.max_steps=9"],
        &["--resume"],
    );
    let i = a.iter().position(|x| x == "--data").unwrap();
    a[i + 1] = data7.display().to_string();
    let other_data = lmms_ft(&a);
    assert_ok(&other_data);
    let err = stderr(&other_data);
    assert!(
        err.contains("dataset records: 6 → 7")
            && err.contains("dataset path")
            && err.contains("data.train")
            && err.contains("written for 6 samples in 3 batches per epoch"),
        "{err}"
    );
    assert_eq!(losses(&out).len(), 9);
}

#[test]
fn a_damaged_checkpoint_is_refused_and_resume_falls_back_to_an_intact_one() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    // One byte flipped: same size, other checksum.
    let flipped = tmp.path().join("flipped");
    copy_dir(&r.out, &flipped);
    let file = flipped.join("checkpoint-6/adapter_model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    let ckpt = flipped.join("checkpoint-6");
    let refused = run(&flipped, &["--resume", ckpt.to_str().unwrap()]);
    assert_fails_with(
        &refused,
        &["adapter_model.safetensors is damaged", "CRC-32"],
    );

    // Truncated: refused when named, passed over by plain `--resume`.
    let out = tmp.path().join("out");
    copy_dir(&r.out, &out);
    // Removed so the resumed run must write it again.
    std::fs::remove_file(out.join("adapter_model.safetensors")).unwrap();
    let file = out.join("checkpoint-6/trainer_state.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let ckpt = out.join("checkpoint-6");
    let refused = run(&out, &["--resume", ckpt.to_str().unwrap()]);
    assert_fails_with(
        &refused,
        &[
            "trainer_state.safetensors is truncated or damaged",
            &format!("the save wrote {len}"),
        ],
    );
    // The resumed run keeps the reference's rows of steps 1 to 4 and logs 5 and 6 again.
    let resumed = run(&out, &["--resume"]);
    assert_ok(&resumed);
    let err = stderr(&resumed);
    assert!(
        err.contains("passing over a damaged checkpoint")
            && err.contains("checkpoint-6")
            && err.contains("newest intact checkpoint")
            && err.contains("checkpoint-4"),
        "{err}"
    );
    assert_same_as_reference(&out);
    assert!(integrity::verify(&out.join("checkpoint-6")).unwrap());
}

/// Bytes a directory takes on a tmpfs (each file rounded up to a 4 KiB page).
fn pages(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                pages(&e.path()) + 4096
            } else {
                e.metadata().unwrap().len().div_ceil(4096) * 4096
            }
        })
        .sum()
}

/// A tmpfs mounted for the test (unmounted on drop).
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &Path, bytes: u64) -> Option<Tmpfs> {
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
        .arg("tmpfs")
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| Tmpfs(dir.to_path_buf()))
}

#[test]
fn a_full_disk_during_a_save_keeps_the_previous_checkpoint() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    // Room for checkpoint-2 and the logs, and half of checkpoint-4.
    let checkpoint = pages(&r.out.join("checkpoint-2"));
    let size = (checkpoint * 3 / 2 + 16 * 1024).div_ceil(4096) * 4096;
    let disk = tmp.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = mount_tmpfs(&disk, size);
    // Reported so a reader of the test log knows which of the two was exercised.
    eprintln!(
        "disk-full test: {}",
        match &mounted {
            Some(_) => format!("a {size}-byte tmpfs"),
            None => format!("mounting refused; {DISK_BYTES_ENV}={size}"),
        }
    );
    let out = disk.join("out");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lmms-ft"));
    cmd.args(args(qwen2_vl(), &out, &[], &[]));
    if mounted.is_none() {
        cmd.env(DISK_BYTES_ENV, size.to_string());
    }
    let full = cmd.output().unwrap();
    assert_fails_with(
        &full,
        &[
            "checkpoint-4",
            "out of disk space: the checkpoint needs about",
            "checkpoint-4.tmp was removed",
            "the previous checkpoint",
            "checkpoint-2 is intact",
        ],
    );
    assert!(!out.join("checkpoint-4.tmp").exists(), "partial save left");
    assert_eq!(steps(&out), vec![2]);
    assert!(integrity::verify(&out.join("checkpoint-2")).unwrap());

    // With room again, the run resumes from checkpoint-2 to the reference's weights.
    let resumed_dir = tmp.path().join("resumed");
    copy_dir(&out, &resumed_dir);
    drop(mounted);
    assert_ok(&run(&resumed_dir, &["--resume"]));
    assert_same_as_reference(&resumed_dir);
}

#[test]
fn sigkill_during_a_save_then_resume_matches_an_uninterrupted_run() {
    reference();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args(args(qwen2_vl(), &out, &[], &[]))
        .env(STALL_SAVE_ENV, "4")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !out.join(STALLED_MARKER).exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run exited before the save of step 4: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "never reached the save"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    assert!(
        out.join("checkpoint-4.tmp").is_dir(),
        "killed before the save began"
    );
    assert_eq!(steps(&out), vec![2]);

    // A new run may not take this directory, `--resume` continues it.
    assert_fails_with(
        &run(&out, &[]),
        &["already holds another run", "checkpoint-4.tmp"],
    );
    let resumed = run(&out, &["--resume"]);
    assert_ok(&resumed);
    assert!(!out.join("checkpoint-4.tmp").exists());
    assert_eq!(steps(&out), vec![2, 4, 6]);
    assert_same_as_reference(&out);
}
