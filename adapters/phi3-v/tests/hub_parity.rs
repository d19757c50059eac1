//! Phi-3-V against the Hub's own remote code (transformers 4.45.2) through the references
//! committed in `tests/data/phi3v`: for a multi-turn text sample, one image, one image that
//! fills all crops and two images over two turns, our template + processor give the Hub
//! processor's ids, `image_sizes` and pixel values and the label rule's labels; the model's
//! logits (≤ 1e-4), loss (≤ 1e-5 relative) and named gradients (≤ 1e-4 relative) equal the
//! Hub model's; a batch of three with different image counts and sizes equals the Hub code
//! run per sample. The parameter count of the real 128k config equals the Hub's on meta.

mod common;

use common::{assert_rel_close, Fixture, SAMPLES};
use lmms_ft_core::family::Trainable;
use lmms_ft_core::family::{
    ChatTemplate, Collator, EncodedText, Family, HfConfig, Model, Processor,
};
use lmms_ft_core::testing::{hf_configs, max_abs_diff};
use lmms_ft_phi3_v::config::Phi3VConfig;
use lmms_ft_phi3_v::family::{Phi3V, Sample};
use lmms_ft_phi3_v::model::{Batch, Phi3VModel};
use lmms_ft_phi3_v::processor::{PhiMedia, CROP};
use tch::{Device, Kind, Tensor};

fn config(fx: &Fixture) -> Phi3VConfig {
    Phi3V::config(&fx.dir).unwrap()
}

#[test]
fn parameter_counts_equal_the_hub_code() {
    let fx = Fixture::load();
    let real: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            hf_configs().join("microsoft--Phi-3-vision-128k-instruct/config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let real = Phi3VConfig::from_hf_json(&real).unwrap();
    assert_eq!(
        real.num_parameters(),
        fx.meta["real_num_parameters"].as_u64().unwrap()
    );
    assert_eq!(real.clip.encoder.hidden_size, 1024);
    assert_eq!(real.rope_scaling.as_ref().unwrap().short_factor.len(), 48);
    let tiny = config(&fx);
    assert_eq!(
        tiny.num_parameters(),
        fx.meta["num_parameters"].as_u64().unwrap()
    );
    let model = Phi3VModel::new_in(
        &tiny,
        Device::Cpu,
        lmms_ft_core::nn::ParamInit::Zeros,
        Kind::Float,
    );
    let built: i64 = model
        .var_store()
        .variables()
        .values()
        .map(Tensor::numel)
        .map(|n| n as i64)
        .sum();
    assert_eq!(built as u64, tiny.num_parameters());
}

/// Our processor's crops of one sample, padded to `num_crops + 1` views per image as the Hub
/// processor pads them, flattened per image.
fn padded_pixels(media: &PhiMedia, views: i64) -> Tensor {
    let per: Vec<Tensor> = media
        .crops
        .iter()
        .map(|c| {
            let n = c.size()[0];
            let pad = Tensor::zeros([views - n, 3, CROP, CROP], (Kind::Float, Device::Cpu));
            Tensor::cat(&[c.shallow_clone(), pad], 0).flatten(0, -1)
        })
        .collect();
    Tensor::stack(&per, 0)
}

/// Template + processor against the Hub processor, sample by sample; returns our samples
/// (with the model-level labels of the reference: every text token).
fn encode_all(fx: &Fixture) -> Vec<(String, Sample)> {
    let config = config(fx);
    let template = Phi3V::template(&config, &fx.dir).unwrap();
    let processor = Phi3V::processor(&config, &fx.dir, &Default::default()).unwrap();
    let mut out = Vec::new();
    for name in SAMPLES {
        let prepared = fx.prepared(name);
        let (media, tokens) = processor.process(&prepared.media.images, &[]).unwrap();
        let text = template
            .encode(&prepared.conversation, &tokens, false)
            .unwrap();
        assert_eq!(
            text.input_ids,
            fx.ids(name, "input_ids"),
            "{name}: input ids"
        );
        assert_eq!(text.labels, fx.ids(name, "rule_labels"), "{name}: labels");
        if let Some(sizes) = fx.get(name, "image_sizes") {
            let ours: Vec<i64> = media
                .grids
                .iter()
                .flat_map(|&(r, c)| [r * CROP, c * CROP])
                .collect();
            assert_eq!(
                ours,
                Vec::<i64>::try_from(sizes.flatten(0, -1)).unwrap(),
                "{name}: image_sizes"
            );
            let shape = fx.ids(name, "pixel_shape");
            let flat = padded_pixels(&media, shape[1]);
            let index = fx.tensor(name, "pixel_index");
            let sample = flat.index_select(1, index);
            let d = max_abs_diff(&sample, fx.tensor(name, "pixel_sample"));
            assert!(d <= 1e-6, "{name}: pixel values differ by {d}");
            let views = flat.view([shape[0], shape[1], -1]).to_kind(Kind::Double);
            let sums = views.sum_dim_intlist(-1, false, Kind::Double);
            let d = max_abs_diff(&sums, fx.tensor(name, "pixel_sums"));
            assert!(d <= 1e-3, "{name}: per-view pixel sums differ by {d}");
            let sq = (&views * &views).sum_dim_intlist(-1, false, Kind::Double);
            let d = max_abs_diff(&sq, fx.tensor(name, "pixel_sq_sums"));
            assert!(d <= 1e-3, "{name}: per-view squared sums differ by {d}");
        }
        let labels = fx.ids(name, "labels");
        let sample = Phi3V::sample(
            EncodedText {
                input_ids: text.input_ids,
                labels,
            },
            media,
        );
        out.push((name.to_string(), sample));
        eprintln!("{name}: ids, labels, image sizes and pixel values equal the Hub processor's");
    }
    out
}

/// Logits of row `row` of `logits` against the sample's digests (full rows at two positions,
/// fixed columns and the log-sum-exp at every position).
fn check_logits(fx: &Fixture, name: &str, logits: &Tensor, len: i64) -> f64 {
    let logits = logits.narrow(0, 0, len);
    let rows = fx.tensor(name, "logit_rows");
    let cols = &fx.reference["logit_columns"];
    let d = [
        max_abs_diff(
            &logits.index_select(0, rows),
            fx.tensor(name, "logits_full"),
        ),
        max_abs_diff(
            &logits.index_select(1, cols),
            fx.tensor(name, "logits_cols"),
        ),
        max_abs_diff(
            &logits.logsumexp([-1], false),
            fx.tensor(name, "logits_lse"),
        ),
    ]
    .into_iter()
    .fold(0.0, f64::max);
    assert!(d <= 1e-4, "{name}: logits differ by {d}");
    d
}

const TRACKED_MIN: usize = 6;

fn check_grads(fx: &Fixture, model: &Phi3VModel, prefix: &str) -> usize {
    let vars = model.var_store().variables();
    let mut compared = 0;
    for (key, want) in &fx.reference {
        let Some(param) = key.strip_prefix(&format!("{prefix}.grad.")) else {
            continue;
        };
        let got = vars[param].grad();
        let rel = assert_rel_close(&got, want, 1e-4, &format!("{prefix}: grad of {param}"));
        eprintln!("{prefix}: grad of {param} within {rel:.2e}");
        compared += 1;
    }
    compared
}

fn zero_grads(model: &Phi3VModel) {
    for (_, mut v) in model.var_store().variables() {
        v.zero_grad();
    }
}

#[test]
fn samples_and_a_batch_of_three_match_the_hub_code() {
    let fx = Fixture::load();
    let config = config(&fx);
    let model = Phi3VModel::load(&config, &fx.dir, Device::Cpu, Kind::Float).unwrap();
    let collator = Phi3V::collator(&config);
    let samples = encode_all(&fx);
    for (name, sample) in &samples {
        let len = sample.text.input_ids.len() as i64;
        let one = Sample {
            text: sample.text.clone(),
            media: PhiMedia {
                crops: sample
                    .media
                    .crops
                    .iter()
                    .map(Tensor::shallow_clone)
                    .collect(),
                grids: sample.media.grids.clone(),
            },
        };
        let batch: Batch = collator.collate(vec![one], Device::Cpu).unwrap();
        zero_grads(&model);
        let logits = tch::no_grad(|| model.logits(&batch)).unwrap();
        let d = check_logits(&fx, name, &logits.get(0), len);
        let out = model.forward(&batch, true).unwrap();
        let loss = out.mean_loss().unwrap();
        let (ours, theirs) = (
            loss.double_value(&[]),
            fx.meta["samples"][name]["loss"].as_f64().unwrap(),
        );
        assert!(
            ((ours - theirs) / theirs).abs() <= 1e-5,
            "{name}: loss {ours} vs {theirs}"
        );
        loss.backward();
        let n = check_grads(&fx, &model, name);
        let media = name != "text";
        assert!(
            n >= if media { TRACKED_MIN } else { 4 },
            "{name}: {n} gradients"
        );
        // The rule labels give the Hub's rule loss too.
        let mut rule = sample.text.clone();
        rule.labels = fx.ids(name, "rule_labels");
        let one = Phi3V::sample(
            rule,
            PhiMedia {
                crops: sample
                    .media
                    .crops
                    .iter()
                    .map(Tensor::shallow_clone)
                    .collect(),
                grids: sample.media.grids.clone(),
            },
        );
        let batch = collator.collate(vec![one], Device::Cpu).unwrap();
        let rule_loss = tch::no_grad(|| model.forward(&batch, false))
            .unwrap()
            .mean_loss()
            .unwrap()
            .double_value(&[]);
        let want = fx.meta["samples"][name]["rule_loss"].as_f64().unwrap();
        assert!(
            ((rule_loss - want) / want).abs() <= 1e-5,
            "{name}: rule loss {rule_loss} vs {want}"
        );
        eprintln!("{name}: logits within {d:.2e}, loss {ours:.6} vs {theirs:.6}, {n} gradients");
    }

    // The batch of three, right-padded in one forward, against the per-sample oracle.
    let order: Vec<String> = fx.meta["batch"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let mut rows = Vec::new();
    let mut lens = Vec::new();
    for name in &order {
        let (_, s) = samples.iter().find(|(n, _)| n == name).unwrap();
        lens.push(s.text.input_ids.len() as i64);
        rows.push(Sample {
            text: s.text.clone(),
            media: PhiMedia {
                crops: s.media.crops.iter().map(Tensor::shallow_clone).collect(),
                grids: s.media.grids.clone(),
            },
        });
    }
    let batch = collator.collate(rows, Device::Cpu).unwrap();
    assert_eq!(batch.images.as_ref().unwrap().grids.len(), 3);
    zero_grads(&model);
    let logits = tch::no_grad(|| model.logits(&batch)).unwrap();
    for (i, name) in order.iter().enumerate() {
        let d = check_logits(&fx, name, &logits.get(i as i64), lens[i]);
        eprintln!("batch row {i} ({name}): logits within {d:.2e}");
    }
    let out = model.forward(&batch, true).unwrap();
    let loss = out.mean_loss().unwrap();
    let (ours, theirs) = (
        loss.double_value(&[]),
        fx.meta["batch"]["loss"].as_f64().unwrap(),
    );
    assert!(
        ((ours - theirs) / theirs).abs() <= 1e-5,
        "batch: loss {ours} vs {theirs}"
    );
    loss.backward();
    let n = check_grads(&fx, &model, "batch");
    assert!(n >= TRACKED_MIN, "batch: {n} gradients");
    eprintln!("batch of three: loss {ours:.6} vs {theirs:.6}, {n} gradients");
}
