//! `lmms-ft train --set train.mode=qlora` end to end on the tiny Qwen2-VL fixture, with
//! gradient checkpointing: the run trains (non-zero gradients through the checkpointed 4-bit
//! layers), writes only a PEFT adapter naming the unquantised base, and `merge-lora` merges
//! it into that base; `peft` on the `transformers` model gives the same logits as lmms-ft's
//! LoRA-on-dense model and as the merged checkpoint. Bad `[quant]` settings are clear errors.

#[path = "../adapters/qwen2-vl/tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lmms_ft_core::family::Model;
use lmms_ft_core::peft::io::{load_adapter, read_safetensors, write_safetensors, Blob};
use lmms_ft_core::testing::run_oracle;
use lmms_ft_core::train::metrics::read_rows;
use lmms_ft_qwen2_vl::model::Qwen2VlModel;
use serde_json::Value;
use support::{assert_ok, lmms_ft, train_args};
use tch::{Device, Kind, Tensor};

fn train(fx: &common::Fixture, data: &Path, out: &Path, sets: &[&str]) -> Output {
    let qlora = [
        "train.mode=qlora",
        "train.gradient_checkpointing=true",
        "train.max_steps=4",
        "train.batch_size=2",
        "train.learning_rate=1e-2",
        "lora.r=4",
    ];
    let sets: Vec<&str> = qlora.iter().chain(sets).copied().collect();
    lmms_ft(&train_args(&fx.dir, data, out, &sets))
}

fn stderr_of(out: &Output) -> String {
    assert!(!out.status.success(), "the run should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn qlora_run_writes_a_peft_adapter_that_merges_into_the_dense_base() {
    let fx = common::fixture();
    let tmp = tempfile::tempdir().unwrap();
    let data = support::image_dataset(tmp.path());
    let out = tmp.path().join("out");
    assert_ok(&train(fx, &data, &out, &[]));

    assert!(out.join("adapter_config.json").is_file());
    assert!(
        !out.join("model.safetensors").exists(),
        "QLoRA saves no base weights"
    );
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["base_model_name_or_path"],
        fx.dir.display().to_string().as_str()
    );
    let keys = read_safetensors(&out.join("adapter_model.safetensors")).unwrap();
    assert!(!keys.is_empty());
    assert!(keys
        .keys()
        .all(|k| k.contains(".lora_A.") || k.contains(".lora_B.")));
    let cfg = lmms_ft_core::config::from_file(&out.join("lmms-ft-config.toml")).unwrap();
    assert_eq!(cfg.quant.quant_type, "nf4");

    let rows = read_rows(&out.join("metrics.jsonl")).unwrap();
    let norms: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.get("grad_norm").and_then(Value::as_f64))
        .collect();
    assert_eq!(norms.len(), 4);
    assert!(
        norms.iter().all(|&n| n > 0.0),
        "no gradient reached the adapters: {norms:?}"
    );

    // The adapter on the dense base in lmms-ft, merged by the CLI, and in peft.
    let mut model = Qwen2VlModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap();
    load_adapter(&mut model, &out, &Arc::new(AtomicBool::new(false))).unwrap();
    let ours: BTreeMap<String, Blob> = tch::no_grad(|| {
        [("text", 0), ("image", 1), ("video", 3)]
            .iter()
            .map(|&(n, i)| {
                let l: Tensor = model.logits(&fx.batches[i]).unwrap();
                (n.to_string(), Blob::from_tensor(&l).unwrap())
            })
            .collect()
    });
    let ours_path = tmp.path().join("ours.safetensors");
    write_safetensors(&ours_path, &ours).unwrap();
    let merged = tmp.path().join("merged");
    assert_ok(&lmms_ft(&[
        "merge-lora",
        "--base",
        fx.dir.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]));
    let printed = run_oracle(
        "train_peft_check.py",
        &[
            fx.dir.to_str().unwrap(),
            out.to_str().unwrap(),
            merged.to_str().unwrap(),
            ours_path.to_str().unwrap(),
        ],
    );
    let result: Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    for name in ["text", "image", "video"] {
        let r = &result[name];
        eprintln!("{name}: {r}");
        assert!(r["peft_vs_ours"].as_f64().unwrap() <= 1e-4, "{name}: {r}");
        assert!(r["merged_vs_ours"].as_f64().unwrap() <= 1e-4, "{name}: {r}");
        assert!(r["base_vs_ours"].as_f64().unwrap() > 1e-3, "{name}: {r}");
    }
}

#[test]
fn bad_quant_settings_are_clear_errors() {
    let fx = common::fixture();
    let tmp = tempfile::tempdir().unwrap();
    let data = support::image_dataset(tmp.path());
    let out = tmp.path().join("out");
    let err = stderr_of(&train(fx, &data, &out, &["quant.type=int3"]));
    assert!(err.contains("quant.type") && err.contains("nf4"), "{err}");
    let err = stderr_of(&train(fx, &data, &out, &["quant.blocksize=100"]));
    assert!(err.contains("quant.blocksize"), "{err}");
    let err = stderr_of(&train(fx, &data, &out, &["train.llm=full"]));
    assert!(err.contains("train.llm"), "{err}");
    let err = stderr_of(&train(
        fx,
        &data,
        &out,
        &["quant.modules=[\"no_such_proj\"]"],
    ));
    assert!(err.contains("quant.modules"), "{err}");
}
