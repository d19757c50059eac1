//! `lmms-ft train` and `lmms-ft merge-lora` end to end on the tiny Qwen2-VL checkpoint of
//! `scripts/oracle/qwen2_vl_fixture.py`, with a small dataset over its two images.
//!
//! - A LoRA run writes every promised file and, without a terminal, plain structured log
//!   lines instead of a progress bar; its adapter loads in `peft` (and in lmms-ft) with
//!   the same logits, and `merge-lora` gives a checkpoint `transformers` loads with them too.
//! - A full run writes sharded Hugging Face weights equal to the trained parameters, which
//!   `transformers` loads with lmms-ft's logits.
//! - A run stopped by SIGINT saves a checkpoint; `--resume` then ends bit-identical to an
//!   uninterrupted run (weights and every logged loss).
//! - Bad samples are skipped and logged with their location under `on_bad_sample = "skip"`,
//!   and stop the run with their location under `"error"`.

#[path = "../adapters/qwen2-vl/tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lmms_ft_core::family::{HfConfig, Model};
use lmms_ft_core::peft::io::{load_adapter, read_safetensors, write_safetensors, Blob};
use lmms_ft_core::testing::{max_abs_diff, run_oracle};
use lmms_ft_core::train::metrics::read_rows;
use lmms_ft_qwen2_vl::config::Qwen2VlConfig;
use lmms_ft_qwen2_vl::model::Qwen2VlModel;
use serde_json::{json, Value};
use support::assert_ok;
use tch::{Device, Kind, Tensor};

fn record(question: &str, answer: &str, image: Option<&str>) -> Value {
    let mut r = json!({"conversations": [
        {"from": "human", "value": match image { Some(_) => format!("<image>\n{question}"), None => question.to_string() }},
        {"from": "gpt", "value": answer},
    ]});
    if let Some(image) = image {
        r["image"] = json!(image);
    }
    r
}

/// Nine samples (eight with one of the fixture's images, one text-only) as a JSON array, and
/// three of them as JSONL for evaluation.
fn dataset(dir: &Path) -> (PathBuf, PathBuf) {
    let mut records: Vec<Value> = (0..8)
        .map(|i| {
            let (image, answer) = match i % 2 {
                0 => ("image_a.png", "It is mostly red."),
                _ => ("image_b.png", "Blue and green stripes."),
            };
            record(&format!("What is in picture {i}?"), answer, Some(image))
        })
        .collect();
    records.push(record("Say hi.", "Hi there!", None));
    let train = dir.join("train.json");
    std::fs::write(&train, serde_json::to_string(&records).unwrap()).unwrap();
    let eval = dir.join("eval.jsonl");
    let lines: Vec<String> = records[..3].iter().map(Value::to_string).collect();
    std::fs::write(&eval, lines.join("\n")).unwrap();
    (train, eval)
}

fn lmms_ft(args: &[String]) -> Output {
    support::lmms_ft(args)
}

fn train_args(fx: &common::Fixture, data: &Path, out: &Path, sets: &[&str]) -> Vec<String> {
    support::train_args(&fx.dir, data, out, sets)
}

/// lmms-ft's logits on the fixture's text, image and video samples.
fn logits_of(model: &Qwen2VlModel, fx: &common::Fixture) -> BTreeMap<String, Tensor> {
    tch::no_grad(|| {
        ["text", "image", "video"]
            .iter()
            .zip([0, 1, 3])
            .map(|(n, i)| (n.to_string(), model.logits(&fx.batches[i]).unwrap()))
            .collect()
    })
}

fn write_logits(logits: &BTreeMap<String, Tensor>, path: &Path) {
    let blobs: BTreeMap<String, Blob> = logits
        .iter()
        .map(|(k, v)| (k.clone(), Blob::from_tensor(v).unwrap()))
        .collect();
    write_safetensors(path, &blobs).unwrap();
}

fn oracle_json(script: &str, args: &[&Path]) -> Value {
    let args: Vec<&str> = args.iter().map(|p| p.to_str().unwrap()).collect();
    let printed = run_oracle(script, &args);
    serde_json::from_str(printed.lines().last().unwrap()).unwrap()
}

#[test]
fn lora_run_writes_outputs_that_load_in_peft_and_merge_in_transformers() {
    let fx = common::fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (train, eval) = dataset(tmp.path());
    let out = tmp.path().join("out");
    let run = lmms_ft(&train_args(
        fx,
        &train,
        &out,
        &[
            "train.max_steps=4",
            "train.batch_size=2",
            "train.learning_rate=1e-2",
            "train.save_steps=2",
            "train.save_total_limit=1",
            "train.eval_steps=2",
            "lora.r=4",
            "lora.modules_to_save=[\"lm_head\"]",
            &format!("data.eval={}", eval.display()),
        ],
    ));
    assert_ok(&run);
    // Not a terminal, so no progress bar: structured log lines with the step's figures.
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.lines().any(|l| l.contains("train")
            && l.contains("step=4")
            && l.contains("loss=")
            && l.contains("lr=")),
        "no structured train log line in:\n{stderr}"
    );
    assert!(
        !stderr.contains('\r') && !stderr.contains("█"),
        "progress bar drawn on a non-terminal"
    );

    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
        "lmms-ft-config.toml",
        "metrics.jsonl",
        "loss.png",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let kept: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(kept, vec!["checkpoint-4"], "save_total_limit = 1");

    // The resolved config parses and holds the command line's values.
    let cfg = lmms_ft_core::config::from_file(&out.join("lmms-ft-config.toml")).unwrap();
    assert_eq!(cfg.train.max_steps, Some(4));
    assert_eq!(cfg.lora.modules_to_save, vec!["lm_head".to_string()]);
    assert_eq!(cfg.data.eval.as_deref(), Some(eval.as_path()));

    // One train row per step and an eval row every 2 steps, all finite.
    let rows = read_rows(&out.join("metrics.jsonl")).unwrap();
    let train_steps: Vec<u64> = rows
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(train_steps, vec![1, 2, 3, 4]);
    for r in rows.iter().filter(|r| r.get("loss").is_some()) {
        for key in ["loss", "lr", "grad_norm", "tokens_per_s", "peak_rss_mb"] {
            let v = r[key].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v >= 0.0, "{key} in {r}");
        }
    }
    let eval_steps: Vec<u64> = rows
        .iter()
        .filter(|r| r.get("eval_loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(eval_steps, vec![2, 4]);

    let png = image::open(out.join("loss.png")).unwrap();
    assert_eq!((png.width(), png.height()), (900, 540));
    let rgb = png.to_rgb8();
    let blue = rgb.pixels().filter(|p| p[2] > 200 && p[0] < 60).count();
    let red = rgb.pixels().filter(|p| p[0] > 200 && p[2] < 60).count();
    assert!(
        blue > 100 && red > 100,
        "curves missing: {blue} blue, {red} red pixels"
    );

    // The adapter loads back into lmms-ft and, through the oracle, into peft.
    let mut model = Qwen2VlModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap();
    load_adapter(&mut model, &out, &Arc::new(AtomicBool::new(false))).unwrap();
    let ours = logits_of(&model, fx);
    let ours_path = tmp.path().join("ours.safetensors");
    write_logits(&ours, &ours_path);

    let merged = tmp.path().join("merged");
    let run = lmms_ft(&[
        "merge-lora".into(),
        "--base".into(),
        fx.dir.to_str().unwrap().into(),
        "--adapter".into(),
        out.to_str().unwrap().into(),
        "--out".into(),
        merged.to_str().unwrap().into(),
    ]);
    assert_ok(&run);
    assert!(merged.join("config.json").is_file() && merged.join("tokenizer.json").is_file());

    let result = oracle_json("train_peft_check.py", &[&fx.dir, &out, &merged, &ours_path]);
    for name in ["text", "image", "video"] {
        let r = &result[name];
        assert!(r["peft_vs_ours"].as_f64().unwrap() <= 1e-4, "{name}: {r}");
        assert!(r["merged_vs_ours"].as_f64().unwrap() <= 1e-4, "{name}: {r}");
        assert!(
            r["base_vs_ours"].as_f64().unwrap() > 1e-3,
            "{name}: adapter changes nothing: {r}"
        );
    }
}

#[test]
fn full_run_writes_sharded_weights_that_load_in_transformers() {
    let fx = common::fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = dataset(tmp.path());
    let out = tmp.path().join("out");
    let run = lmms_ft(&train_args(
        fx,
        &train,
        &out,
        &[
            "train.mode=full",
            "train.max_steps=3",
            "train.batch_size=3",
            "train.learning_rate=1e-3",
            "train.save_steps=3",
            // 30 MiB shards split the 78 MB checkpoint.
            "train.max_shard_size=31457280",
        ],
    ));
    assert_ok(&run);
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards: std::collections::BTreeSet<String> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let n = shards.len();
    assert!(n > 1, "not sharded: {shards:?}");
    for i in 1..=n {
        let name = format!("model-{i:05}-of-{n:05}.safetensors");
        assert!(
            shards.contains(&name) && out.join(&name).is_file(),
            "{name}"
        );
    }
    assert!(out.join("config.json").is_file() && out.join("tokenizer.json").is_file());
    assert!(!out.join("adapter_config.json").exists());

    // The saved weights are exactly the trained parameters of the last checkpoint.
    let mut saved = BTreeMap::new();
    for shard in &shards {
        saved.extend(read_safetensors(&out.join(shard)).unwrap());
    }
    let state = read_safetensors(&out.join("checkpoint-3/trainer_state.safetensors")).unwrap();
    let mut trained = 0;
    for (key, value) in &state {
        if let Some(name) = key.strip_prefix("param.") {
            assert_eq!(max_abs_diff(&saved[name], value), 0.0, "{name}");
            trained += 1;
        }
    }
    assert!(trained > 10, "{trained} trained tensors");

    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let config = Qwen2VlConfig::from_hf_json(&json).unwrap();
    let model = Qwen2VlModel::load(&config, &out, Device::Cpu, Kind::Float).unwrap();
    let ours_path = tmp.path().join("ours.safetensors");
    write_logits(&logits_of(&model, fx), &ours_path);
    let result = oracle_json("train_full_check.py", &[&fx.dir, &out, &ours_path]);
    for name in ["text", "image", "video"] {
        let r = &result[name];
        assert!(r["hf_vs_ours"].as_f64().unwrap() <= 1e-4, "{name}: {r}");
        assert!(
            r["base_vs_ours"].as_f64().unwrap() > 1e-3,
            "{name}: weights unchanged: {r}"
        );
    }
}

/// Trainable tensors of an adapter file.
fn adapter_tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    read_safetensors(&dir.join("adapter_model.safetensors")).unwrap()
}

fn train_losses(dir: &Path) -> Vec<(u64, f64)> {
    read_rows(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("loss")?.as_f64()?)))
        .collect()
}

#[test]
fn sigint_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run() {
    let fx = common::fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = dataset(tmp.path());
    // 5 batches per epoch, 2 per step: steps cross epoch boundaries mid-accumulation.
    let sets = [
        "train.max_steps=12",
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.learning_rate=5e-3",
        "train.save_steps=4",
        "lora.r=4",
        "lora.dropout=0.1",
    ];
    let straight = tmp.path().join("straight");
    assert_ok(&lmms_ft(&train_args(fx, &train, &straight, &sets)));

    let stopped = tmp.path().join("stopped");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args(train_args(fx, &train, &stopped, &sets))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let logged = std::fs::read_to_string(stopped.join("metrics.jsonl")).unwrap_or_default();
        if logged.contains("\"step\":2,") {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before step 2"
        );
        assert!(start.elapsed() < Duration::from_secs(300), "no step 2");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = child.wait_with_output().unwrap();
    assert_ok(&output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("interrupted after step"), "{stdout}");
    assert!(
        !stopped.join("adapter_model.safetensors").exists(),
        "outputs of an unfinished run"
    );
    let latest = lmms_ft_core::train::checkpoint::latest(&stopped)
        .unwrap()
        .expect("a checkpoint on interrupt");
    let step: u64 = latest
        .to_str()
        .unwrap()
        .rsplit('-')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((2..12).contains(&step), "checkpoint at step {step}");

    let mut args = train_args(fx, &train, &stopped, &sets);
    args.push("--resume".into());
    assert_ok(&lmms_ft(&args));

    let (a, b) = (adapter_tensors(&stopped), adapter_tensors(&straight));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, t) in &a {
        assert_eq!(
            max_abs_diff(t, &b[name]),
            0.0,
            "{name} differs after resume"
        );
    }
    assert!(a.values().any(|t| t.abs().max().double_value(&[]) > 0.0));
    let (la, lb) = (train_losses(&stopped), train_losses(&straight));
    assert_eq!(la.len(), 12);
    assert_eq!(la, lb, "per-step losses differ after resume");
}

#[test]
fn bad_samples_are_skipped_and_logged_or_stop_the_run_with_their_location() {
    let fx = common::fixture();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fx.dir.join("image_a.png"), tmp.path().join("a.png")).unwrap();
    std::fs::write(
        tmp.path().join("broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    let good = record("What is it?", "Red.", Some("a.png")).to_string();
    let text = record("Say hi.", "Hi!", None).to_string();
    let broken_json = r#"{"conversations": [{"from": "human", "value": "Hi"}"#.to_string();
    let broken_png = record("What is it?", "?", Some("broken.png")).to_string();
    let missing = record("What is it?", "?", Some("missing.png")).to_string();
    let write = |name: &str, lines: &[&String]| {
        let path = tmp.path().join(name);
        let lines: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
        std::fs::write(&path, lines.join("\n")).unwrap();
        path
    };
    let data = write(
        "data.jsonl",
        &[&good, &broken_json, &text, &broken_png, &missing, &good],
    );
    let run = |data: &Path, out: &str, policy: &str| {
        let mut args = train_args(
            fx,
            data,
            &tmp.path().join(out),
            &[
                "train.max_steps=2",
                "train.batch_size=2",
                &format!("data.on_bad_sample={policy}"),
            ],
        );
        // Media paths are relative to the dataset file.
        let i = args.iter().position(|a| a == "--image-folder").unwrap();
        args.drain(i..i + 2);
        lmms_ft(&args)
    };

    let skipped = run(&data, "skip", "skip");
    assert_ok(&skipped);
    let log = String::from_utf8_lossy(&skipped.stderr);
    for (line, what) in [(2, "json"), (4, "broken.png"), (5, "missing.png")] {
        let hit = log.lines().any(|l| {
            l.contains("skipping")
                && l.contains(&format!("data.jsonl:{line}"))
                && l.to_lowercase().contains(what)
        });
        assert!(hit, "line {line} ({what}) not logged as skipped:\n{log}");
    }
    for line in [1, 3, 6] {
        assert!(
            !log.contains(&format!("data.jsonl:{line} ")),
            "good line {line} reported:\n{log}"
        );
    }
    assert_eq!(train_losses(&tmp.path().join("skip")).len(), 2);

    let stopped = run(&data, "error", "error");
    assert!(!stopped.status.success());
    let err = String::from_utf8_lossy(&stopped.stderr);
    assert!(err.contains("data.jsonl:2"), "{err}");

    // A file that only fails when decoded stops the run from the loader, located too.
    let data = write("lazy.jsonl", &[&good, &text, &broken_png, &good]);
    let stopped = run(&data, "lazy", "error");
    assert!(!stopped.status.success());
    let err = String::from_utf8_lossy(&stopped.stderr);
    assert!(
        err.contains("lazy.jsonl:3") && err.contains("broken.png"),
        "{err}"
    );
}

#[test]
fn a_non_finite_loss_stops_the_run_and_names_the_last_good_checkpoint() {
    let fx = common::fixture();
    let tmp = tempfile::tempdir().unwrap();
    let (train, _) = dataset(tmp.path());
    let out = tmp.path().join("out");
    // Step 1 trains from lora_B = 0 (finite loss); its update of ~1e38 overflows step 2.
    let run = lmms_ft(&train_args(
        fx,
        &train,
        &out,
        &[
            "train.max_steps=4",
            "train.batch_size=2",
            "train.learning_rate=1e38",
            "train.warmup_ratio=0",
            "train.max_grad_norm=0",
            "train.save_steps=1",
        ],
    ));
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("at step 2") && err.contains("checkpoint-1"),
        "{err}"
    );
    let kept: Vec<u64> = lmms_ft_core::train::checkpoint::list(&out)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, vec![1], "the last good checkpoint is kept");
    assert!(!out.join("adapter_model.safetensors").exists());
}
