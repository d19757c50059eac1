//! Build-your-own LLaVA end to end through the real `lmms-ft train` binary and the shipped
//! `configs/build-llava-stage{1,2}.toml` (only paths and step counts overridden), on tiny
//! random sources that `transformers` writes (`scripts/oracle/build_llava.py`): a
//! `LlamaForCausalLM` with a plain Llama-2 tokenizer (no `<image>`) and a `CLIPVisionModel`.
//!
//! * Stage 1 trains only the projector: every LLM and vision tensor of its output is
//!   bit-equal to the sources, the embedding and `lm_head` gained one row (`<image>`, id
//!   32000) equal to the mean of the source rows, and the projector moved away from its
//!   initialisation (N(0, 0.02) weights, zero biases).
//! * Stage 2 starts from stage 1's output, trains projector and LLM, leaves the tower
//!   bit-equal to the source.
//! * Both outputs load in `transformers`' `LlavaForConditionalGeneration` with no missing,
//!   unexpected or mismatched weight and no warning, and with the processor and tokenizer of
//!   the directory give the ids (16 `<image>` tokens), pixels (equal up to float rounding,
//!   ≤ 1e-6, for an image that only needs padding, within 2/255 after a resize) and logits (≤ 1e-4, from transformers'
//!   pixels, and end to end from ours for the padding-only image) that lmms-ft gives.
//! * Stage 2 with LoRA on the LLM (and the projector saved with the adapter): `peft` loads
//!   the adapter over stage 1's output without a warning, and its logits equal those of the
//!   checkpoint `lmms-ft merge-lora` writes (≤ 1e-4), differing from stage 1's.
//! * Qwen2 + SigLIP compose too (ChatML template, `"full"` strategy, tied embeddings, an
//!   existing `<image>` token reused, the `"linear"` projector).
//! * Qwen2.5 + Chinese-CLIP (a `ChineseCLIPVisionModel` with OFA-Sys's processor settings:
//!   exact square resize, no crop) train in both stages; a full `ChineseCLIPModel` composes
//!   to the same tower. The tower's selected features (≤ 1e-5) and the logits agree with
//!   transformers in every `check_against_transformers`.
//! * Bad `[model]` input (unknown kind, missing directory, unsupported LLM or tower, compose
//!   keys without a kind, kind with a path) fails with a message naming the problem.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lmms_ft_core::data::media::{load_image, ImageLimits};
use lmms_ft_core::family::{ChatTemplate, Family, Model, Processor, Trainable};
use lmms_ft_core::testing::{conversation_from_messages, hf_configs, max_abs_diff, run_oracle};
use lmms_ft_llava::family::Llava;
use lmms_ft_llava::model::Batch;
use tch::{Device, Kind, Tensor};

const SOURCE_VOCAB: i64 = 32000;

fn lmms_ft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args(args)
        .output()
        .expect("running lmms-ft")
}

fn config_path(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
        .display()
        .to_string()
}

/// `lmms-ft train --config configs/NAME` with `--set` overrides; returns stderr on failure.
fn train(name: &str, sets: &[String]) -> Result<(), String> {
    let config = config_path(name);
    let mut args = vec!["train", "--config", config.as_str()];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    let out = lmms_ft(&args);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Tiny-run overrides shared by both stages.
fn tiny_run(src: &Path, out: &Path, steps: u32) -> Vec<String> {
    vec![
        format!("data.train={}", src.join("data.json").display()),
        format!("data.image_folder={}", src.join("images").display()),
        format!("train.output_dir={}", out.display()),
        format!("train.max_steps={steps}"),
        "train.batch_size=2".into(),
        "train.grad_accum=1".into(),
        "train.device=cpu".into(),
        "train.precision=fp32".into(),
        "train.logging_steps=1".into(),
        "train.dataloader_workers=1".into(),
    ]
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn bit_equal(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.equal(b)
}

/// transformers' view of `dir` against lmms-ft's on one user turn with `image`: `<image>`
/// has `image_token_id`, the vocabulary `vocab` entries, an image 16 tokens. `resampled`:
/// whether the image needs a resize (else both processors must agree exactly).
fn check_against_transformers(
    dir: &Path,
    image: &Path,
    work: &Path,
    image_token_id: i64,
    vocab: i64,
    resampled: bool,
) {
    let reference_path = work.join(format!(
        "{}-reference.safetensors",
        dir.file_name().unwrap().to_str().unwrap()
    ));
    let printed = run_oracle(
        "build_llava.py",
        &[
            "check",
            dir.to_str().unwrap(),
            image.to_str().unwrap(),
            reference_path.to_str().unwrap(),
        ],
    );
    let facts: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    eprintln!("{}: transformers says {facts}", dir.display());
    let reference = read(&reference_path);

    let config = Llava::config(dir).unwrap();
    assert_eq!(config.image_token_id, image_token_id);
    assert_eq!(facts["image_token_id"], image_token_id);
    assert_eq!(config.text.decoder.vocab_size, vocab);
    assert_eq!(facts["vocab_size"], vocab);
    assert_eq!(facts["num_image_tokens"], config.tokens_per_tile());
    assert_eq!(config.tokens_per_tile(), 16);

    let processor = Llava::processor(&config, dir, &Default::default()).unwrap();
    let template = Llava::template(&config, dir).unwrap();
    let img = load_image(image, &ImageLimits::default()).unwrap();
    let (h, w) = (img.height() as i64, img.width() as i64);
    let (media, tokens) = processor.process(&[img], &[]).unwrap();
    let conv = conversation_from_messages(&serde_json::json!([{
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}],
    }]));
    let ids = template.encode_prompt(&conv, &tokens).unwrap();
    let theirs: Vec<i64> = Vec::try_from(reference["input_ids"].flatten(0, -1)).unwrap();
    assert_eq!(
        ids,
        theirs,
        "{}: prompt ids ({})",
        dir.display(),
        facts["text"]
    );

    // Padding to a square (do_pad) and the resize happen on both sides; PIL-exact up to the
    // rounding of the resampler.
    let their_pixels = &reference["pixel_values"];
    let ours = Tensor::from_slice(&media.pixels).view([1, 3, 56, 56]);
    let pixel_diff = max_abs_diff(&ours, their_pixels);
    assert!(
        resampled || pixel_diff <= 1e-6,
        "{}: pixels of an image that needs no resize differ by {pixel_diff}",
        dir.display()
    );
    assert!(
        pixel_diff <= 2.0 / 255.0 / 0.26,
        "{}: pixel values differ by {pixel_diff} ({})",
        dir.display(),
        facts["image_processor"]
    );

    let model = Llava::load(&config, dir, Device::Cpu, Kind::Float).unwrap();
    // The tower alone: transformers' hidden_states at the feature layer, strategy applied.
    let features = tch::no_grad(|| model.selected_features(their_pixels)).unwrap();
    let feature_diff = max_abs_diff(&features, &reference["vision_features"]);
    assert!(
        feature_diff <= 1e-5,
        "{}: vision features of the selected layer differ by {feature_diff}",
        dir.display()
    );
    let input_ids = Tensor::from_slice(&ids).view([1, -1]);
    for (name, pixels) in [("their", their_pixels.shallow_clone()), ("our", ours)] {
        let batch = Batch {
            input_ids: input_ids.shallow_clone(),
            targets: None,
            pixel_values: Some(pixels),
            image_sizes: vec![[h, w]],
            image_anyres: Vec::new(),
            pixel_values_videos: None,
            video_frames: Vec::new(),
            media_tokens: [
                ids.iter().filter(|&&t| t == config.image_token_id).count() as i64,
                0,
            ],
            packing: None,
        };
        let logits = tch::no_grad(|| model.logits(&batch)).unwrap();
        let diff = max_abs_diff(&logits, &reference["logits"]);
        eprintln!(
            "{}: logits with {name} pixels differ by {diff:.3e}",
            dir.display()
        );
        // Resampling differences of up to 2/255 move the logits by ~1e-3, so our own pixels
        // are held to 1e-4 where no resampling happens (the probe image).
        if name == "their" || !resampled {
            assert!(
                diff <= 1e-4,
                "{}: logits with {name} pixels differ by {diff}",
                dir.display()
            );
        }
    }
}

/// Hub name of a source LLM tensor inside the composed checkpoint.
fn composed_llm_name(name: &str) -> String {
    format!("language_model.{name}")
}

#[test]
fn build_llava_in_two_stages_loads_in_transformers() {
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
    let llm = read(&src.join("llm/model.safetensors"));
    let clip = read(&src.join("clip/model.safetensors"));

    // ---- stage 1: projector only ----
    let out1 = tmp.path().join("stage1");
    let mut sets = tiny_run(&src, &out1, 4);
    sets.push(format!("model.text_model={}", src.join("llm").display()));
    sets.push(format!("model.vision_tower={}", src.join("clip").display()));
    train("build-llava-stage1.toml", &sets).unwrap_or_else(|e| panic!("stage 1: {e}"));
    assert!(
        !out1.join(lmms_ft_core::compose::MANIFEST).exists(),
        "the output must load its own weights, not the sources"
    );
    let saved1 = read(&out1.join("model.safetensors"));
    assert_eq!(saved1.len(), llm.len() + clip.len() + 4, "tensor count");
    for (name, source) in &llm {
        let ours = &saved1[&composed_llm_name(name)];
        if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            assert_eq!(ours.size()[0], SOURCE_VOCAB + 1, "{name}");
            assert!(
                bit_equal(&ours.narrow(0, 0, SOURCE_VOCAB), source),
                "{name}"
            );
            let mean =
                source
                    .to_kind(Kind::Double)
                    .mean_dim(Some(&[0i64][..]), false, Kind::Double);
            let new_row = ours.get(SOURCE_VOCAB).to_kind(Kind::Double);
            assert!(
                max_abs_diff(&new_row, &mean) <= 1e-7,
                "{name}: the <image> row is not the mean of the source rows"
            );
        } else {
            assert!(bit_equal(ours, source), "stage 1 changed LLM tensor {name}");
        }
    }
    for (name, source) in &clip {
        let ours = &saved1[&format!("vision_tower.vision_model.{name}")];
        assert!(
            bit_equal(ours, source),
            "stage 1 changed vision tensor {name}"
        );
    }
    // The projector as composed (seeded init) versus as trained.
    let skeleton = out1.join("composed");
    let config = Llava::config(&skeleton).unwrap();
    let initial = Llava::load(&config, &skeleton, Device::Cpu, Kind::Float).unwrap();
    let initial: HashMap<String, Tensor> = initial.var_store().variables();
    for part in ["linear_1", "linear_2"] {
        let w = &initial[&format!("multi_modal_projector.{part}.weight")];
        let std = w.std(true).double_value(&[]);
        assert!((0.018..=0.022).contains(&std), "{part} init std {std}");
        let b = &initial[&format!("multi_modal_projector.{part}.bias")];
        assert_eq!(b.abs().max().double_value(&[]), 0.0, "{part} init bias");
        for which in ["weight", "bias"] {
            let name = format!("multi_modal_projector.{part}.{which}");
            let moved = max_abs_diff(&saved1[&name], &initial[&name]);
            assert!(moved > 1e-4, "stage 1 did not train {name} (moved {moved})");
        }
    }
    check_against_transformers(
        &out1,
        &src.join("probe.png"),
        tmp.path(),
        SOURCE_VOCAB,
        SOURCE_VOCAB + 1,
        false,
    );

    // ---- stage 2: projector and LLM, from stage 1's output ----
    let out2 = tmp.path().join("stage2");
    let mut sets = tiny_run(&src, &out2, 3);
    sets.push(format!("model.path={}", out1.display()));
    train("build-llava-stage2.toml", &sets).unwrap_or_else(|e| panic!("stage 2: {e}"));
    let saved2 = read(&out2.join("model.safetensors"));
    assert_eq!(saved2.len(), saved1.len());
    for (name, source) in &clip {
        let ours = &saved2[&format!("vision_tower.vision_model.{name}")];
        assert!(
            bit_equal(ours, source),
            "stage 2 changed vision tensor {name}"
        );
    }
    for name in [
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "language_model.model.layers.1.mlp.down_proj.weight",
        "language_model.lm_head.weight",
        "multi_modal_projector.linear_1.weight",
    ] {
        assert!(
            !bit_equal(&saved2[name], &saved1[name]),
            "stage 2 did not train {name}"
        );
    }
    check_against_transformers(
        &out2,
        &src.join("images/img1.png"),
        tmp.path(),
        SOURCE_VOCAB,
        SOURCE_VOCAB + 1,
        true,
    );

    // ---- stage 2 with LoRA on the LLM (the variant the stage-2 config describes) ----
    let lora = tmp.path().join("stage2-lora");
    let mut sets = tiny_run(&src, &lora, 2);
    sets.push(format!("model.path={}", out1.display()));
    sets.push("train.llm=lora".into());
    sets.push("lora.modules_to_save=[\"multi_modal_projector\"]".into());
    train("build-llava-stage2.toml", &sets).unwrap_or_else(|e| panic!("stage 2 (LoRA): {e}"));
    let merged = tmp.path().join("stage2-merged");
    let out = lmms_ft(&[
        "merge-lora",
        "--base",
        out1.to_str().unwrap(),
        "--adapter",
        lora.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "merge-lora: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = run_oracle(
        "build_llava.py",
        &[
            "peft",
            out1.to_str().unwrap(),
            lora.to_str().unwrap(),
            merged.to_str().unwrap(),
        ],
    );
    let diffs: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    eprintln!("LoRA stage 2: {diffs}");
    assert!(diffs["peft_vs_merged"].as_f64().unwrap() <= 1e-4, "{diffs}");
    assert!(diffs["peft_vs_base"].as_f64().unwrap() > 1e-4, "{diffs}");
    let saved_merged = read(&merged.join("model.safetensors"));
    for (name, source) in &clip {
        let ours = &saved_merged[&format!("vision_tower.vision_model.{name}")];
        assert!(
            bit_equal(ours, source),
            "LoRA stage 2 changed vision tensor {name}"
        );
    }
    let name = "multi_modal_projector.linear_1.weight";
    assert!(
        !bit_equal(&saved_merged[name], &saved1[name]),
        "the LoRA stage 2 adapter lost the projector's training"
    );
}

/// Qwen2 (tied embeddings, a vocabulary padded past its tokenizer, whose tokenizer already
/// has `<image>`, so the id is reused and no row added) + SigLIP (no class token: `"full"`
/// strategy; its unused pooling head kept), with the `"linear"` projector: composed with
/// the ChatML template, stage 1 leaves both sources bit-equal, the projector's second layer
/// starts as the identity, and the output agrees with transformers.
#[test]
fn qwen2_and_siglip_compose_and_load_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let printed = run_oracle(
        "build_llava.py",
        &[
            "sources_qwen",
            src.to_str().unwrap(),
            hf_configs().to_str().unwrap(),
        ],
    );
    let facts: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    // The source tokenizer already has `<image>`; composing must reuse its id.
    let image_token_id = facts["image_token_id"].as_i64().unwrap();
    assert_eq!(image_token_id, 151646);
    let out = tmp.path().join("stage1");
    let mut sets = tiny_run(&src, &out, 2);
    sets.push(format!("model.text_model={}", src.join("qwen").display()));
    sets.push(format!(
        "model.vision_tower={}",
        src.join("siglip").display()
    ));
    // The shipped stage-1 config names CLIP's strategy; SigLIP wants every token.
    sets.push("model.vision_feature_select_strategy=full".into());
    // LLaVA-1.0's single linear projector, as two layers with an identity activation.
    sets.push("model.projector=linear".into());
    train("build-llava-stage1.toml", &sets).unwrap_or_else(|e| panic!("stage 1: {e}"));
    let composed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("composed/config.json")).unwrap())
            .unwrap();
    assert_eq!(
        composed["vision_config"]["model_type"],
        "siglip_vision_model"
    );
    assert_eq!(composed["vision_feature_select_strategy"], "full");
    assert_eq!(composed["tie_word_embeddings"], true);
    assert_eq!(composed["projector_hidden_act"], "linear");
    let skeleton = out.join("composed");
    let config = Llava::config(&skeleton).unwrap();
    let initial = Llava::load(&config, &skeleton, Device::Cpu, Kind::Float).unwrap();
    let w2 = &initial.var_store().variables()["multi_modal_projector.linear_2.weight"];
    assert!(
        bit_equal(w2, &Tensor::eye(32, (Kind::Float, Device::Cpu))),
        "a linear projector's second layer starts as the identity"
    );
    assert!(std::fs::read_to_string(out.join("chat_template.jinja"))
        .unwrap()
        .contains("<|im_start|>"));

    let saved = read(&out.join("model.safetensors"));
    let qwen = read(&src.join("qwen/model.safetensors"));
    let siglip = read(&src.join("siglip/model.safetensors"));
    for (name, source) in &qwen {
        if name == "lm_head.weight" {
            continue; // tied: the embedding is the head
        }
        let ours = &saved[&composed_llm_name(name)];
        assert!(bit_equal(ours, source), "stage 1 changed LLM tensor {name}");
    }
    for (name, source) in &siglip {
        let ours = &saved[&format!("vision_tower.vision_model.{name}")];
        assert!(
            bit_equal(ours, source),
            "stage 1 changed vision tensor {name}"
        );
    }
    check_against_transformers(
        &out,
        &src.join("images/img3.png"),
        tmp.path(),
        image_token_id,
        151936,
        true,
    );
}

/// Qwen2.5 (tied, a tokenizer without `<image>`, so it is added at 151665, inside the
/// padded vocabulary: no row added) + a Chinese-CLIP tower, in both stages: stage 1 trains
/// only the projector, stage 2 the projector and the LLM; the tower stays bit-equal to the
/// source, and each output agrees with transformers. The full `ChineseCLIPModel` (its BERT
/// text tower and projections left out) gives the same composed tower.
#[test]
fn qwen2_5_and_chinese_clip_train_two_stages_and_load_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let printed = run_oracle(
        "build_llava.py",
        &[
            "sources_chinese",
            src.to_str().unwrap(),
            hf_configs().to_str().unwrap(),
        ],
    );
    let facts: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    let image_token_id = facts["tokenizer_size"].as_i64().unwrap();
    let tower = read(&src.join("chinese-clip/model.safetensors"));
    let qwen = read(&src.join("qwen2.5/model.safetensors"));

    let out1 = tmp.path().join("stage1");
    let mut sets = tiny_run(&src, &out1, 3);
    sets.push(format!(
        "model.text_model={}",
        src.join("qwen2.5").display()
    ));
    sets.push(format!(
        "model.vision_tower={}",
        src.join("chinese-clip").display()
    ));
    train("build-llava-stage1.toml", &sets).unwrap_or_else(|e| panic!("stage 1: {e}"));
    let composed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out1.join("composed/config.json")).unwrap())
            .unwrap();
    assert_eq!(
        composed["vision_config"]["model_type"],
        "chinese_clip_vision_model"
    );
    assert_eq!(composed["image_token_index"], image_token_id);
    let saved1 = read(&out1.join("model.safetensors"));
    for (name, source) in &qwen {
        if name != "lm_head.weight" {
            assert!(
                bit_equal(&saved1[&composed_llm_name(name)], source),
                "stage 1 changed LLM tensor {name}"
            );
        }
    }
    for (name, source) in &tower {
        let ours = &saved1[&format!("vision_tower.vision_model.{name}")];
        assert!(
            bit_equal(ours, source),
            "stage 1 changed vision tensor {name}"
        );
    }
    check_against_transformers(
        &out1,
        &src.join("probe.png"),
        tmp.path(),
        image_token_id,
        151936,
        false,
    );

    let out2 = tmp.path().join("stage2");
    let mut sets = tiny_run(&src, &out2, 2);
    sets.push(format!("model.path={}", out1.display()));
    train("build-llava-stage2.toml", &sets).unwrap_or_else(|e| panic!("stage 2: {e}"));
    let saved2 = read(&out2.join("model.safetensors"));
    for (name, source) in &tower {
        let ours = &saved2[&format!("vision_tower.vision_model.{name}")];
        assert!(
            bit_equal(ours, source),
            "stage 2 changed vision tensor {name}"
        );
    }
    for name in [
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "multi_modal_projector.linear_2.weight",
    ] {
        assert!(
            !bit_equal(&saved2[name], &saved1[name]),
            "stage 2 did not train {name}"
        );
    }
    check_against_transformers(
        &out2,
        &src.join("images/img0.png"),
        tmp.path(),
        image_token_id,
        151936,
        true,
    );

    // The full ChineseCLIPModel composes to the same tower (only its vision_model.* is read).
    let full = tmp.path().join("full");
    let mut sets = tiny_run(&src, &full, 1);
    sets.push(format!(
        "model.text_model={}",
        src.join("qwen2.5").display()
    ));
    sets.push(format!(
        "model.vision_tower={}",
        src.join("chinese-clip-full").display()
    ));
    train("build-llava-stage1.toml", &sets).unwrap_or_else(|e| panic!("full tower: {e}"));
    let from_full = read(&full.join("model.safetensors"));
    let full_source = read(&src.join("chinese-clip-full/model.safetensors"));
    let mut vision_tensors = 0;
    for (name, ours) in &from_full {
        if let Some(rest) = name.strip_prefix("vision_tower.") {
            assert!(bit_equal(ours, &full_source[rest]), "{name}");
            vision_tensors += 1;
        }
    }
    assert_eq!(vision_tensors, tower.len());
}

/// A directory that looks like a checkpoint of the given config (weights are not read
/// before the config is refused).
fn fake_checkpoint(dir: &Path, config: serde_json::Value) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("model.safetensors"), b"").unwrap();
    dir.to_path_buf()
}

#[test]
fn bad_model_sections_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let gpt2 = fake_checkpoint(
        &tmp.path().join("gpt2"),
        serde_json::json!({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 10}),
    );
    let llama = fake_checkpoint(
        &tmp.path().join("llama"),
        serde_json::json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 10}),
    );
    let clip = fake_checkpoint(
        &tmp.path().join("clip"),
        serde_json::json!({"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"]}),
    );
    let out = tmp.path().join("out");
    let with = |extra: &[String]| {
        let mut sets = vec![format!("train.output_dir={}", out.display())];
        sets.extend_from_slice(extra);
        sets
    };
    let text = |p: &Path| format!("model.text_model={}", p.display());
    let vision = |p: &Path| format!("model.vision_tower={}", p.display());
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "build-llava-stage1.toml",
            with(&["model.kind=blip".into(), text(&llama), vision(&clip)]),
            "model.kind `blip` is not a known model kind to compose; known kinds: llava",
        ),
        (
            "build-llava-stage1.toml",
            with(&[text(&tmp.path().join("nowhere")), vision(&clip)]),
            "is not a directory",
        ),
        (
            "build-llava-stage1.toml",
            with(&[text(&gpt2), vision(&clip)]),
            "is not a supported LLM",
        ),
        (
            "build-llava-stage1.toml",
            with(&[text(&llama), vision(&llama)]),
            "is not a supported vision tower",
        ),
        (
            "build-llava-stage1.toml",
            with(&[
                text(&llama),
                vision(&clip),
                "model.projector=qformer".into(),
            ]),
            "model.projector `qformer` is not supported",
        ),
        (
            "build-llava-stage1.toml",
            with(&[text(&llama), vision(&clip), "model.path=/x".into()]),
            "remove model.id / model.path",
        ),
        (
            "build-llava-stage2.toml",
            with(&[text(&llama)]),
            "model.text_model describes a model to compose and needs model.kind",
        ),
    ];
    for (config, sets, expected) in cases {
        let err = train(config, &sets).expect_err("a bad [model] section must fail");
        assert!(
            err.contains(expected),
            "expected `{expected}` for {sets:?}, got:\n{err}"
        );
    }
}
