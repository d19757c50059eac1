//! Checkpoints of the original LLaVA repository, end to end through the binary. The oracle
//! (`scripts/oracle/build_llava.py original`) builds a tiny llava-hf
//! `LlavaForConditionalGeneration` in transformers and writes the same model in the original
//! layout (named as the LLaVA source names its modules, vocabulary without `<image>`,
//! `mm_*` config keys), keeping the CLIP tower in its own directory.
//!
//! * `lmms-ft convert llava-original` writes a directory whose tensors equal the llava-hf
//!   model's (≤ 1e-7: the `<image>` row is the mean of the others on both sides), which
//!   transformers loads with no missing or unexpected weight, with logits equal to the
//!   llava-hf model's (≤ 1e-5), and with a processor that pads (`image_aspect_ratio = pad`).
//! * `evaluate` and `train` take the original directory directly: evaluate's per-sample
//!   losses equal those on the converted directory, and a projector-only run trains the
//!   projector and leaves the LLM bit-equal.
//! * Missing or foreign tensor names, an unsupported projector and an unresolvable tower
//!   are errors that name the tensor, the key or the Hub id.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use lmms_ft_core::testing::{hf_configs, max_abs_diff, run_oracle};
use lmms_ft_llava::weights::canonical_name;
use support::{assert_ok, lmms_ft};
use tch::Tensor;

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

/// A copy of the original checkpoint whose tensors `edit` rewrites.
fn edited(original: &Path, to: &Path, edit: impl Fn(&mut Vec<(String, Tensor)>)) {
    copy_dir(original, to);
    let mut tensors = Tensor::read_safetensors(original.join("model.safetensors")).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, to.join("model.safetensors")).unwrap();
}

fn stderr_of(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn evaluate(model: &Path, sets: &[String], src: &Path, work: &Path, name: &str) -> Vec<f64> {
    let json = work.join(format!("{name}.json"));
    let mut args = vec![
        "evaluate".to_string(),
        "--model-path".into(),
        model.display().to_string(),
        "--data".into(),
        src.join("data.json").display().to_string(),
        "--image-folder".into(),
        src.join("images").display().to_string(),
        "--output-dir".into(),
        work.join(name).display().to_string(),
        "--json".into(),
        json.display().to_string(),
        "--set".into(),
        "train.device=cpu".into(),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    assert_ok(&lmms_ft(&args));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    report["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn original_llava_converts_evaluates_and_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    run_oracle(
        "build_llava.py",
        &[
            "sources",
            src.to_str().unwrap(),
            hf_configs().to_str().unwrap(),
        ],
    );
    let fx = tmp.path().join("fixture");
    run_oracle(
        "build_llava.py",
        &["original", src.to_str().unwrap(), fx.to_str().unwrap()],
    );
    let original = fx.join("original");
    let clip = src.join("clip");

    // ---- convert ----
    let converted = tmp.path().join("converted");
    let out = lmms_ft(&[
        "convert",
        "llava-original",
        "--model",
        original.to_str().unwrap(),
        "--vision-tower",
        clip.to_str().unwrap(),
        "--out",
        converted.to_str().unwrap(),
    ]);
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains(converted.to_str().unwrap()));
    assert!(!converted.join(lmms_ft_core::compose::MANIFEST).exists());
    let ours = read(&converted.join("model.safetensors"));
    let theirs: HashMap<String, Tensor> = read(&fx.join("hf/model.safetensors"))
        .into_iter()
        .map(|(k, v)| (canonical_name(&k), v))
        .collect();
    let mut names: Vec<&String> = ours.keys().collect();
    names.sort();
    let mut expected: Vec<&String> = theirs.keys().collect();
    expected.sort();
    assert_eq!(names, expected, "tensor names");
    let mut worst = 0f64;
    for (name, t) in &ours {
        assert_eq!(t.size(), theirs[name].size(), "{name}");
        let diff = max_abs_diff(t, &theirs[name]);
        assert!(diff <= 1e-7, "{name} differs by {diff}");
        worst = worst.max(diff);
    }
    eprintln!("converted tensors: largest difference to the llava-hf model {worst:.3e}");
    let printed = run_oracle(
        "build_llava.py",
        &[
            "logits",
            converted.to_str().unwrap(),
            fx.join("reference.safetensors").to_str().unwrap(),
        ],
    );
    let diff: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    eprintln!("transformers on the converted directory vs the llava-hf model: {diff}");
    assert!(diff["max_diff"].as_f64().unwrap() <= 1e-5, "{diff}");
    let printed = run_oracle(
        "build_llava.py",
        &[
            "check",
            converted.to_str().unwrap(),
            src.join("probe.png").to_str().unwrap(),
            tmp.path().join("check.safetensors").to_str().unwrap(),
        ],
    );
    let facts: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    assert_eq!(facts["image_processor"], "LlavaImageProcessor", "{facts}");
    assert_eq!(facts["num_image_tokens"], 16, "{facts}");
    assert_eq!(facts["image_token_id"], 32000, "{facts}");

    // ---- evaluate and train on the original directory, converted in memory ----
    let tower_set = vec![format!("model.vision_tower={}", clip.display())];
    let in_memory = evaluate(&original, &tower_set, &src, tmp.path(), "eval-original");
    let on_disk = evaluate(&converted, &[], &src, tmp.path(), "eval-converted");
    assert_eq!(in_memory.len(), 4);
    eprintln!("evaluate: in memory {in_memory:?}, converted {on_disk:?}");
    for (a, b) in in_memory.iter().zip(&on_disk) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }
    let trained = tmp.path().join("trained");
    let mut args: Vec<String> = [
        "train",
        "--model-path",
        original.to_str().unwrap(),
        "--data",
        src.join("data.json").to_str().unwrap(),
        "--image-folder",
        src.join("images").to_str().unwrap(),
        "--output-dir",
        trained.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for s in [
        tower_set[0].as_str(),
        "train.device=cpu",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.mode=full",
        "train.vision=frozen",
        "train.llm=frozen",
        "train.projector=full",
        "train.learning_rate=1e-3",
    ] {
        args.push("--set".into());
        args.push(s.into());
    }
    assert_ok(&lmms_ft(&args));
    let after = read(&trained.join("model.safetensors"));
    for (name, t) in &ours {
        let changed = !t.equal(&after[name]);
        assert_eq!(
            changed,
            name.starts_with("multi_modal_projector."),
            "{name}: changed = {changed}"
        );
    }

    // ---- bad checkpoints ----
    let convert = |model: &Path, out: &str| {
        lmms_ft(&[
            "convert",
            "llava-original",
            "--model",
            model.to_str().unwrap(),
            "--vision-tower",
            clip.to_str().unwrap(),
            "--out",
            tmp.path().join(out).to_str().unwrap(),
        ])
    };
    let missing = tmp.path().join("missing");
    edited(&original, &missing, |t| {
        t.retain(|(n, _)| n != "model.mm_projector.2.bias")
    });
    let err = stderr_of(&convert(&missing, "out-missing"));
    assert!(err.contains("model.mm_projector.2.bias"), "{err}");
    let foreign = tmp.path().join("foreign");
    edited(&original, &foreign, |t| {
        for (n, _) in t.iter_mut() {
            if n == "model.mm_projector.2.weight" {
                *n = "model.mm_projector.1.weight".into();
            }
        }
    });
    let err = stderr_of(&convert(&foreign, "out-foreign"));
    assert!(
        err.contains("model.mm_projector.1.weight") && err.contains("not in the original layout"),
        "{err}"
    );
    let linear = tmp.path().join("linear");
    copy_dir(&original, &linear);
    let config_path = linear.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["mm_projector_type"] = "linear".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = stderr_of(&convert(&linear, "out-linear"));
    assert!(err.contains("mm_projector_type `linear`"), "{err}");
    // No --vision-tower and an empty Hugging Face cache: the Hub id is named.
    let empty = tmp.path().join("empty-cache");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args([
            "convert",
            "llava-original",
            "--model",
            original.to_str().unwrap(),
            "--out",
            tmp.path().join("out-no-tower").to_str().unwrap(),
        ])
        .env("HF_HOME", &empty)
        .env("HF_HUB_CACHE", &empty)
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert!(
        err.contains("openai/clip-vit-large-patch14-336") && err.contains("--vision-tower"),
        "{err}"
    );
    // A llava-hf loader handed the original config says what it is.
    let out = lmms_ft(&[
        "merge-lora",
        "--base",
        original.to_str().unwrap(),
        "--adapter",
        trained.to_str().unwrap(),
        "--out",
        tmp.path().join("out-merge").to_str().unwrap(),
    ]);
    let err = stderr_of(&out);
    assert!(err.contains("original LLaVA checkpoint"), "{err}");
}
