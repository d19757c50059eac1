//! A LoRA adapter trained by lmms-ft (3 steps, so `lora_B` is non-zero; `lm_head` in
//! `modules_to_save`) is saved in PEFT layout, loaded by `peft.PeftModel.from_pretrained` on
//! the `transformers` model, and must give lmms-ft's logits (≤ 1e-4) while differing from the
//! base model; peft's "missing / unexpected adapter keys" warnings fail the oracle. The
//! merged checkpoint (`merge_lora`, forced into several shards) must load in `transformers`
//! with the same logits, and give them in lmms-ft too. The first case names its targets as
//! PEFT's suffix list; the second trains LoRA on the vision tower as well
//! (`train.vision = "lora"`, default targets: every linear of the parts in lora mode), whose
//! adapters peft must load too, with rsLoRA on (scaling alpha/√r = 4 instead of alpha/r = 2,
//! so a scaling that disagrees with peft's changes the logits).

mod common;

use std::collections::BTreeMap;

use lmms_ft_core::config::{ComponentMode, Config, Scheduler, TargetModules};
use lmms_ft_core::family::Model;
use lmms_ft_core::peft::io::{merge_lora, read_safetensors, save_adapter, write_safetensors, Blob};
use lmms_ft_core::testing::{max_abs_diff, run_oracle};
use lmms_ft_core::train::{TrainOptions, Trainer};
use lmms_ft_qwen2_vl::model::Qwen2VlModel;
use tch::{Device, Kind, Tensor};

#[test]
fn train_adapter_loads_in_peft_and_merged_model_in_transformers() {
    check(false);
}

#[test]
fn vision_lora_adapter_loads_in_peft_and_merged_model_in_transformers() {
    check(true);
}

fn check(vision_lora: bool) {
    let fx = common::fixture();
    let mut model = Qwen2VlModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap();
    let mut c = Config::default();
    c.train.learning_rate = 1e-2;
    c.train.warmup_ratio = 0.0;
    c.train.scheduler = Scheduler::Constant;
    c.lora.r = 4;
    c.lora.alpha = 8.0;
    c.lora.dropout = 0.1;
    c.lora.modules_to_save = vec!["lm_head".into()];
    if vision_lora {
        c.train.vision = Some(ComponentMode::Lora);
        c.lora.use_rslora = true;
    } else {
        // PEFT's suffix-list form, naming every linear of the decoder layers.
        c.lora.target_modules = TargetModules::Names(
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
        );
    }
    let options = TrainOptions::from_config(&c, 3).unwrap();
    let spec = options.lora.clone().unwrap();
    let mut trainer = Trainer::new(&mut model, options).unwrap();
    for i in 0..3 {
        trainer
            .train_step(&[i], |&i| model.forward(&fx.batches[i], true))
            .unwrap();
    }
    trainer.set_training(false);

    let tmp = tempfile::tempdir().unwrap();
    let (adapter, merged) = (tmp.path().join("adapter"), tmp.path().join("merged"));
    save_adapter(&mut model, &spec, &adapter, None).unwrap();
    let keys = read_safetensors(&adapter.join("adapter_model.safetensors")).unwrap();
    for key in [
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.language_model.layers.1.mlp.down_proj.lora_B.weight",
        "base_model.model.lm_head.weight",
    ] {
        assert!(
            keys.contains_key(key),
            "adapter lacks {key}; has {:?}",
            keys.keys().take(5).collect::<Vec<_>>()
        );
    }
    let mut trained_b =
        vec!["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"];
    if vision_lora {
        trained_b.extend([
            "base_model.model.model.visual.blocks.0.attn.qkv.lora_B.weight",
            "base_model.model.model.visual.blocks.1.mlp.fc2.lora_B.weight",
        ]);
    }
    for key in trained_b {
        let b = keys
            .get(key)
            .unwrap_or_else(|| panic!("adapter lacks {key}"));
        assert!(
            b.abs().max().double_value(&[]) > 0.0,
            "{key} is still zero: the check would pass vacuously"
        );
    }

    let names = ["text", "image", "video"];
    let ours: BTreeMap<String, Tensor> = tch::no_grad(|| {
        names
            .iter()
            .zip([0, 1, 3])
            .map(|(n, i)| (n.to_string(), model.logits(&fx.batches[i]).unwrap()))
            .collect()
    });
    let blobs: BTreeMap<String, Blob> = ours
        .iter()
        .map(|(k, v)| (k.clone(), Blob::from_tensor(v).unwrap()))
        .collect();
    let ours_path = tmp.path().join("ours.safetensors");
    write_safetensors(&ours_path, &blobs).unwrap();

    // Merge onto a fresh base model; 30 MB shards split the 78 MB checkpoint.
    let mut base = Qwen2VlModel::load(&fx.config, &fx.dir, Device::Cpu, Kind::Float).unwrap();
    let n = merge_lora(&mut base, &fx.dir, &adapter, &merged, 30 << 20).unwrap();
    let expected = if vision_lora { 14 + 8 } else { 14 };
    assert_eq!(
        n, expected,
        "2 layers × 7 linear layers (+ 2 vision blocks × 4) merged"
    );
    assert!(
        merged.join("model.safetensors.index.json").is_file(),
        "merged checkpoint is not sharded"
    );
    assert!(merged.join("config.json").is_file() && merged.join("tokenizer.json").is_file());
    for (name, i) in names.iter().zip([0, 1, 3]) {
        let logits = tch::no_grad(|| base.logits(&fx.batches[i]).unwrap());
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
