//! `lmms-ft evaluate` on the committed Phi-3-V fixture (`tests/data/phi3v`, references from
//! the Hub's remote code): per-sample losses under the label rule, label counts and the
//! token-weighted mean equal the Hub code run per sample, for a text, a one-image, an
//! all-crops and a two-image two-turn sample in one batch of four. A record whose
//! `<|image_N|>` names a missing image fails with an error naming the record and the tag.
//! `list-models` reports the family implemented, and `validate-data`, a QLoRA `train`,
//! `merge-lora`, a full `train` and `generate` run end to end; the full and merged outputs
//! carry the base directory's files (the Hub's remote code and `auto_map` when it has them).

mod support;

use std::process::Command;

use lmms_ft_core::testing::{assert_evaluate_report, repo_root};
use support::{assert_ok, image_dataset, llava_record, train_args};

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

fn lmms_ft(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn list_models_reports_phi3_v_implemented() {
    let out = lmms_ft(&["list-models", "--json"]);
    assert!(out.status.success());
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let ours: Vec<&serde_json::Value> = rows.iter().filter(|r| r["family"] == "phi3-v").collect();
    assert_eq!(ours.len(), 2, "Phi-3-V and Phi-3.5-V");
    for row in ours {
        assert_eq!(row["status"], "implemented", "{row}");
    }
}

#[test]
fn validate_qlora_full_merge_and_generate_run_end_to_end() {
    let (fixture, _) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    // The base as users have it: with a file of the Hub's remote code beside the weights
    // (a stand-in: the real code is not in the repository), which outputs must carry.
    let dir = tmp.path().join("base");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(dir.join("modeling_phi3_v.py"), "# remote code stand-in\n").unwrap();
    let data = image_dataset(tmp.path());
    assert_ok(&lmms_ft(&[
        "validate-data",
        "--model-path",
        dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--image-folder",
        dir.to_str().unwrap(),
    ]));
    let out = tmp.path().join("qlora");
    let run = support::lmms_ft(&train_args(
        &dir,
        &data,
        &out,
        &[
            "train.mode=\"qlora\"",
            "train.max_steps=3",
            "train.batch_size=2",
            "train.learning_rate=1e-2",
            "lora.r=4",
        ],
    ));
    assert_ok(&run);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("quantised 8 linear layers"),
        "the 8 fused LLM linears are not reported quantised:\n{stderr}"
    );
    assert!(out.join("adapter_model.safetensors").is_file());
    let merged = tmp.path().join("merged");
    assert_ok(&lmms_ft(&[
        "merge-lora",
        "--base",
        dir.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]));
    let full = tmp.path().join("full");
    assert_ok(&support::lmms_ft(&train_args(
        &dir,
        &data,
        &full,
        &[
            "train.mode=\"full\"",
            "train.max_steps=2",
            "train.batch_size=3",
        ],
    )));
    let base_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    for out in [&merged, &full] {
        assert!(
            out.join("modeling_phi3_v.py").is_file(),
            "{}",
            out.display()
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            config["auto_map"],
            base_config["auto_map"],
            "{}",
            out.display()
        );
        assert!(config["auto_map"]["AutoModelForCausalLM"].is_string());
        let run = lmms_ft(&[
            "generate",
            "--model-path",
            out.to_str().unwrap(),
            "--prompt",
            "What is this?",
            "--image",
            dir.join("image_b.png").to_str().unwrap(),
            "--set",
            "train.device=cpu",
            "--max-new-tokens",
            "3",
            "--json",
        ]);
        assert_ok(&run);
        let reply: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        let n = reply["token_ids"].as_array().unwrap().len();
        assert!(n == 3 || (n < 3 && reply["stopped"] == true), "{reply}");
    }
}

/// The Hub's remote code, when present beside the checkout or in `$LMMS_FT_PHI3V_HUB_CODE`.
fn hub_code() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("LMMS_FT_PHI3V_HUB_CODE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            repo_root()
                .parent()
                .unwrap()
                .join("shared/hf-configs/microsoft--Phi-3-vision-128k-instruct")
        });
    if dir.join("modeling_phi3_v.py").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("LMMS_FT_REQUIRE_PHI3V_HUB_CODE").is_none(),
        "LMMS_FT_REQUIRE_PHI3V_HUB_CODE is set but {} has no Phi-3-V Hub code",
        dir.display()
    );
    eprintln!(
        "NOT CHECKED: no Phi-3-V Hub code in {} (set LMMS_FT_PHI3V_HUB_CODE)",
        dir.display()
    );
    None
}

/// With the Hub code: a base carrying the real remote-code files, trained with LoRA and fully
/// by lmms-ft; the merge-lora and full outputs load with `trust_remote_code=True` and the
/// adapter loads in `peft` on the Hub code, each giving the loss `lmms-ft evaluate` gives
/// (≤ 1e-5 relative), and the adapter changes the loss.
#[test]
fn outputs_load_with_trust_remote_code_and_peft() {
    let Some(code) = hub_code() else { return };
    let (fixture, meta) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for dir in [&fixture, &code] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let take = dir == &fixture || name.ends_with(".py");
            if path.is_file() && take {
                std::fs::copy(&path, base.join(&name)).unwrap();
            }
        }
    }
    let data = image_dataset(tmp.path());
    let lora = tmp.path().join("lora");
    assert_ok(&support::lmms_ft(&train_args(
        &base,
        &data,
        &lora,
        &["train.max_steps=2", "train.learning_rate=5e-2", "lora.r=4"],
    )));
    let merged = tmp.path().join("merged");
    assert_ok(&lmms_ft(&[
        "merge-lora",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        lora.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]));
    let full = tmp.path().join("full");
    assert_ok(&support::lmms_ft(&train_args(
        &base,
        &data,
        &full,
        &[
            "train.mode=\"full\"",
            "train.max_steps=2",
            "train.warmup_ratio=0.0",
            "train.learning_rate=1e-2",
        ],
    )));
    let name = "image";
    let images: Vec<&str> = meta["samples"][name]["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let record = llava_record(&meta["samples"][name]["messages"], &images);
    let eval_data = tmp.path().join("eval.json");
    std::fs::write(&eval_data, serde_json::json!([record]).to_string()).unwrap();
    let ours = |model: &std::path::Path, adapter: Option<&std::path::Path>| -> f64 {
        let report = tmp.path().join("report.json");
        let mut args = vec![
            "evaluate".to_string(),
            "--model-path".into(),
            model.to_str().unwrap().into(),
            "--data".into(),
            eval_data.to_str().unwrap().into(),
            "--image-folder".into(),
            fixture.to_str().unwrap().into(),
            "--json".into(),
            report.to_str().unwrap().into(),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter".into(), a.to_str().unwrap().into()]);
        }
        assert_ok(&support::lmms_ft(&args));
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        r["samples"][0]["loss"].as_f64().unwrap()
    };
    let theirs = |model: &std::path::Path, adapter: Option<&std::path::Path>| -> f64 {
        let out = lmms_ft_core::testing::run_oracle(
            "phi3v_interop.py",
            &[
                fixture.to_str().unwrap(),
                model.to_str().unwrap(),
                name,
                adapter.map_or("", |a| a.to_str().unwrap()),
                code.to_str().unwrap(),
            ],
        );
        let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let base_loss = meta["samples"][name]["rule_loss"].as_f64().unwrap();
    for (what, model, adapter) in [
        ("merged", &merged, None),
        ("full", &full, None),
        ("adapter", &base, Some(lora.as_path())),
    ] {
        let (a, b) = (ours(model, adapter), theirs(model, adapter));
        eprintln!("{what}: lmms-ft {a:.6}, Hub code {b:.6} (base {base_loss:.6})");
        assert!(((a - b) / b).abs() <= 1e-5, "{what}: {a} vs {b}");
        assert!(
            (a - base_loss).abs() > 1e-3,
            "{what}: training changed nothing"
        );
    }
}
