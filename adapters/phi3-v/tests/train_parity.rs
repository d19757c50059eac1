//! Ten LoRA steps (gradient accumulation 2) equal the Hub code + `peft` + torch AdamW step by
//! step (loss, learning rate, gradient norm, final adapter and projector weights), through the
//! shared `core::testing::train_parity` protocol, against the run `scripts/oracle/phi3v_train.py`
//! recorded in `tests/data/phi3v/train_lora` (the Hub code is not in the repository). LoRA
//! adapts the fused `qkv_proj` / `gate_up_proj` (and `o_proj`, `down_proj`) under the names
//! `peft` gives them on the Hub code; the initial adapter is the oracle's, read from its PEFT
//! files. The same adapter, loaded in our model, gives the logits peft gave on the Hub code.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use common::{clone_sample, sample_with_labels, Fixture, SAMPLES};
use lmms_ft_core::family::{Collator, Family, Model};
use lmms_ft_core::peft::io::load_adapter;
use lmms_ft_core::testing::max_abs_diff;
use lmms_ft_core::testing::train_parity::{TrainCase, TrainParity};
use lmms_ft_phi3_v::family::Phi3V;
use lmms_ft_phi3_v::model::Phi3VModel;
use tch::{Device, Kind, Tensor};

const LLM_TARGETS: &str = r"model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)";

#[test]
fn lora_steps_equal_the_hub_code_with_peft() {
    let fx = Fixture::load();
    let config = Phi3V::config(&fx.dir).unwrap();
    let collator = Phi3V::collator(&config);
    let samples: Vec<_> = SAMPLES.iter().map(|n| sample_with_labels(&fx, n)).collect();
    let recorded = fx.dir.join("train_lora");
    let load = || Phi3VModel::load(&config, &fx.dir, Device::Cpu, Kind::Float).unwrap();

    // The oracle's initial adapter changes the logits exactly as peft on the Hub code did.
    let mut model = load();
    load_adapter(
        &mut model,
        &recorded.join("init_adapter"),
        &Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    let init: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(recorded.join("init_logits.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    for (name, sample) in SAMPLES.iter().zip(&samples) {
        let batch = collator
            .collate(vec![clone_sample(sample)], Device::Cpu)
            .unwrap();
        let logits = tch::no_grad(|| model.logits(&batch)).unwrap().get(0);
        let cols = logits.index_select(1, &fx.reference["logit_columns"]);
        let d = max_abs_diff(&cols, &init[&format!("{name}.logits_cols")]).max(max_abs_diff(
            &logits.logsumexp([-1], false),
            &init[&format!("{name}.logits_lse")],
        ));
        let moved = max_abs_diff(&cols, fx.tensor(name, "logits_cols"));
        assert!(
            d <= 1e-4,
            "{name}: logits with the peft adapter differ by {d}"
        );
        assert!(
            moved > 1e-2,
            "{name}: the adapter changes nothing ({moved})"
        );
        eprintln!("{name}: peft adapter logits within {d:.2e} (base moved by {moved:.2e})");
    }
    drop(model);

    let parity = TrainParity {
        script: "phi3v_train.py",
        fixture: &fx.dir,
        steps: 10,
        llm_targets: LLM_TARGETS,
        vision_targets: "",
        vision_blocks: "model.vision_embed_tokens.img_processor.vision_model.encoder",
        vision_lora_tensors: 0,
    };
    parity.check_recorded(
        TrainCase::Lora,
        2,
        SAMPLES.len(),
        &recorded,
        load,
        |model: &Phi3VModel, i| {
            let batch = collator.collate(vec![clone_sample(&samples[i])], Device::Cpu)?;
            model.forward(&batch, true)
        },
        1e-5,
    );
}
