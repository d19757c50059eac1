//! `lmms-ft evaluate --generate` on the tiny LLaVA-1.5 fixture: each sample's prediction is
//! the greedy reply `generate` gives to the conversation before its last answer (the three
//! prompts are generated as one batch), the per-sample JSONL and the report hold the same
//! rows, and the scores equal the independent references of `scripts/oracle/text_metrics.py`
//! (SQuAD v2.0 exact match / F1, `rouge_score` ROUGE-L). The references are rewritten from a
//! first run's predictions (one equal, one partly overlapping, one unrelated), so the scores
//! are not all zero as they would be for a random model's answers.

use std::path::Path;

use lmms_ft_core::testing::{cached_fixture, run_oracle};

mod support;
use support::{assert_ok, llava_record, lmms_ft};

fn evaluate(fixture: &Path, data: &Path, json: &Path) -> serde_json::Value {
    assert_ok(&lmms_ft(&[
        "evaluate",
        "--model-path",
        fixture.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--image-folder",
        fixture.to_str().unwrap(),
        "--generate",
        "--max-new-tokens",
        "6",
        "--json",
        json.to_str().unwrap(),
    ]));
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

#[test]
fn generated_answers_are_scored_like_the_references() {
    let (fixture, _) = cached_fixture("llava_fixture.py", "llava");
    let tmp = tempfile::tempdir().unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("reference.json")).unwrap())
            .unwrap();
    let samples = [
        ("text", vec![]),
        ("image", vec!["image_b.png"]),
        ("two_images", vec!["image_a.png", "image_b.png"]),
    ];
    let mut records: Vec<serde_json::Value> = samples
        .iter()
        .map(|(name, images)| llava_record(&meta["samples"][name]["messages"], images))
        .collect();
    let data = tmp.path().join("data.json");
    std::fs::write(&data, serde_json::to_string(&records).unwrap()).unwrap();
    let first = evaluate(&fixture, &data, &tmp.path().join("first.json"));
    let predictions: Vec<String> = first["generation"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["prediction"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(predictions.len(), 3);

    // The image sample's prediction is what `generate` answers for that prompt.
    let out = lmms_ft(&[
        "generate",
        "--model-path",
        fixture.to_str().unwrap(),
        "--image",
        fixture.join("image_b.png").to_str().unwrap(),
        "--prompt",
        "Describe it.",
        "--max-new-tokens",
        "6",
    ]);
    assert_ok(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), predictions[1]);

    // New references: the prediction itself (in other case and punctuation), part of it
    // with other words, and the original answer.
    let words: Vec<&str> = predictions[1].split_whitespace().collect();
    assert!(
        words.len() >= 2,
        "prediction {:?} is too short",
        predictions[1]
    );
    let references = [
        format!("{}!", predictions[0].to_uppercase()),
        format!("The {} and {} here", words[0], words[words.len() - 1]),
        "Blue.".to_string(),
    ];
    for (record, reference) in records.iter_mut().zip(&references) {
        let turns = record["conversations"].as_array_mut().unwrap();
        turns.last_mut().unwrap()["value"] = reference.clone().into();
    }
    std::fs::write(&data, serde_json::to_string(&records).unwrap()).unwrap();
    let json = tmp.path().join("second.json");
    let report = evaluate(&fixture, &data, &json);
    let generation = &report["generation"];
    let rows = generation["samples"].as_array().unwrap();
    let jsonl: Vec<serde_json::Value> =
        std::fs::read_to_string(tmp.path().join("predictions.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(&jsonl, rows, "predictions.jsonl vs the report");

    let pairs: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["prediction"].as_str().unwrap().to_string(),
                r["reference"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for ((pred, reference), (old, new)) in pairs.iter().zip(predictions.iter().zip(&references)) {
        assert_eq!(pred, old, "the reference changed the prediction");
        assert_eq!(reference, new);
    }
    let file = tmp.path().join("pairs.json");
    std::fs::write(&file, serde_json::to_string(&pairs).unwrap()).unwrap();
    let printed = run_oracle("text_metrics.py", &[file.to_str().unwrap()]);
    let oracle: Vec<serde_json::Value> =
        serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    for key in ["exact_match", "token_f1", "rouge_l"] {
        let mut sum = 0.0;
        for (i, (row, want)) in rows.iter().zip(&oracle).enumerate() {
            let (ours, want) = (row[key].as_f64().unwrap(), want[key].as_f64().unwrap());
            assert!(
                (ours - want).abs() < 1e-12,
                "sample {i}: {key} {ours} vs {want}"
            );
            sum += want;
        }
        let mean = generation[key].as_f64().unwrap();
        assert!((mean - sum / 3.0).abs() < 1e-12, "mean {key} {mean}");
        eprintln!("{key}: {mean:.4}");
    }
    assert_eq!(rows[0]["exact_match"], 1.0);
    let f1 = rows[1]["token_f1"].as_f64().unwrap();
    assert!(f1 > 0.0 && f1 < 1.0, "partial overlap scored {f1}");
    // The loss part of the report is still there.
    assert_eq!(report["samples"].as_array().unwrap().len(), 3);
}
