//! A LoRA adapter trained by lmms-ft (3 steps, so `lora_B` is non-zero), saved in PEFT
//! layout, loads with `peft.PeftModel.from_pretrained` on the `transformers` model and
//! gives lmms-ft's logits (≤ 1e-4) while differing from the base model; peft's "missing /
//! unexpected adapter keys" warnings fail the oracle. The merged checkpoint (`merge_lora`,
//! forced into shards) loads in `transformers` with the same logits, and in lmms-ft too.

mod common;

use std::collections::BTreeMap;

use lmms_ft_core::config::{Config, Scheduler};
use lmms_ft_core::family::Model;
use lmms_ft_core::peft::io::{merge_lora, read_safetensors, save_adapter, write_safetensors, Blob};
use lmms_ft_core::testing::{max_abs_diff, run_oracle};
use lmms_ft_core::train::{TrainOptions, Trainer};
use lmms_ft_mllama::model::MllamaModel;
use tch::{Device, Kind, Tensor};

#[test]
fn train_adapter_loads_in_peft_and_merged_model_in_transformers() {
    let fx = common::fixture();
    let names = ["text", "image", "two_images"];
    let batches: Vec<_> = names.iter().map(|n| fx.batch(n, "labels")).collect();
    let mut model = MllamaModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap();
    let mut c = Config::default();
    c.train.learning_rate = 1e-2;
    c.train.warmup_ratio = 0.0;
    c.train.scheduler = Scheduler::Constant;
    c.lora.r = 4;
    c.lora.alpha = 8.0;
    c.lora.dropout = 0.1;
    let options = TrainOptions::from_config(&c, 3).unwrap();
    let spec = options.lora.clone().unwrap();
    let mut trainer = Trainer::new(&mut model, options).unwrap();
    for i in 0..3 {
        trainer
            .train_step(&[i], |&i| model.forward(&batches[i], true))
            .unwrap();
    }
    trainer.set_training(false);

    let tmp = tempfile::tempdir().unwrap();
    let (adapter, merged) = (tmp.path().join("adapter"), tmp.path().join("merged"));
    save_adapter(&mut model, &spec, &adapter, None).unwrap();
    let keys = read_safetensors(&adapter.join("adapter_model.safetensors")).unwrap();
    for key in [
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.language_model.layers.1.cross_attn.k_proj.lora_B.weight",
        "base_model.model.model.language_model.layers.2.mlp.down_proj.lora_B.weight",
    ] {
        let t = keys.get(key).unwrap_or_else(|| {
            panic!(
                "adapter lacks {key}; has {:?}",
                keys.keys().take(5).collect::<Vec<_>>()
            )
        });
        if key.contains("lora_B") {
            assert!(t.abs().max().double_value(&[]) > 0.0, "{key} is still zero");
        }
    }
    assert!(
        !keys
            .keys()
            .any(|k| k.contains("vision_model") || k.contains("lm_head")),
        "only the LLM's layers are adapted by default"
    );

    let ours: BTreeMap<String, Tensor> = tch::no_grad(|| {
        names
            .iter()
            .zip(&batches)
            .map(|(n, b)| (n.to_string(), model.logits(b).unwrap()))
            .collect()
    });
    let blobs: BTreeMap<String, Blob> = ours
        .iter()
        .map(|(k, v)| (k.clone(), Blob::from_tensor(v).unwrap()))
        .collect();
    let ours_path = tmp.path().join("ours.safetensors");
    write_safetensors(&ours_path, &blobs).unwrap();

    // Merge onto a fresh base model; 30 MB shards split the 66 MB checkpoint.
    let mut base = MllamaModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap();
    let n = merge_lora(&mut base, &fx.dir, &adapter, &merged, 30 << 20).unwrap();
    assert_eq!(
        n, 21,
        "3 layers × 7 linear layers merged (self- and cross-attention)"
    );
    assert!(
        merged.join("model.safetensors.index.json").is_file(),
        "merged checkpoint is not sharded"
    );
    for (name, b) in names.iter().zip(&batches) {
        let logits = tch::no_grad(|| base.logits(b).unwrap());
        let d = max_abs_diff(&logits, &ours[*name]);
        assert!(d <= 1e-4, "{name}: merged model in lmms-ft differs by {d}");
    }

    let printed = run_oracle(
        "train_peft_check.py",
        &[
            fx.dir.to_str().unwrap(),
            adapter.to_str().unwrap(),
            merged.to_str().unwrap(),
            ours_path.to_str().unwrap(),
        ],
    );
    let result: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    for name in names {
        let r = &result[name];
        eprintln!("{name}: {r}");
        assert!(
            r["peft_vs_ours"].as_f64().unwrap() <= 1e-4,
            "{name}: peft logits differ: {r}"
        );
        assert!(
            r["merged_vs_ours"].as_f64().unwrap() <= 1e-4,
            "{name}: merged logits differ: {r}"
        );
        assert!(
            r["base_vs_ours"].as_f64().unwrap() > 1e-3,
            "{name}: the adapter changes nothing: {r}"
        );
    }
}
