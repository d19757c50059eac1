//! The answer metrics of `evaluate --generate` against independent references
//! (`scripts/oracle/text_metrics.py`): exact match and token F1 from the official SQuAD v2.0
//! evaluation functions, ROUGE-L from Google's `rouge_score` (with a letters-and-digits
//! tokenizer, and on ASCII text also its own tokenizer, which must then agree). Cases cover
//! articles, punctuation, case, repeated words, reordering, empty answers and non-ASCII text.

use lmms_ft_core::eval::metrics::{exact_match, rouge_l, token_f1, Scores};
use lmms_ft_core::testing::run_oracle;

const CASES: &[(&str, &str)] = &[
    ("A red square.", "red square"),
    ("The red square", "a blue square"),
    ("red red red", "red"),
    ("square red", "red square"),
    ("It is a big red square on the left", "a red square"),
    ("", ""),
    ("", "something"),
    ("nothing", ""),
    ("the", "an"),
    ("Hello, world! It's 3:45 p.m.", "hello world its 345 pm"),
    ("one two three four five six", "six five four three two one"),
    ("a b c d e f g", "a x c y e z g"),
    ("Ünïcode wörds here", "ünïcode wörds"),
    ("画像に赤い四角", "赤い 四角"),
    ("snake_case and kebab-case", "snake case and kebab case"),
];

#[test]
fn metrics_match_squad_and_rouge_score() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.json");
    std::fs::write(&pairs, serde_json::to_string(CASES).unwrap()).unwrap();
    let printed = run_oracle("text_metrics.py", &[pairs.to_str().unwrap()]);
    let oracle: Vec<serde_json::Value> =
        serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    assert_eq!(oracle.len(), CASES.len());
    let mut partial = 0;
    for ((pred, reference), want) in CASES.iter().zip(&oracle) {
        let get = |k: &str| want[k].as_f64().unwrap();
        let ours = Scores::of(pred, reference);
        assert_eq!(
            exact_match(pred, reference),
            get("exact_match"),
            "{pred:?} / {reference:?}: exact match"
        );
        assert!(
            (token_f1(pred, reference) - get("token_f1")).abs() < 1e-12,
            "{pred:?} / {reference:?}: token F1 {} vs {}",
            ours.token_f1,
            get("token_f1")
        );
        assert!(
            (rouge_l(pred, reference) - get("rouge_l")).abs() < 1e-12,
            "{pred:?} / {reference:?}: ROUGE-L {} vs {}",
            ours.rouge_l,
            get("rouge_l")
        );
        if pred.is_ascii() && reference.is_ascii() {
            assert!(
                (ours.rouge_l - get("rouge_l_default")).abs() < 1e-12,
                "{pred:?} / {reference:?}: ROUGE-L {} vs rouge_score's tokenizer {}",
                ours.rouge_l,
                get("rouge_l_default")
            );
        }
        if ours.token_f1 > 0.0 && ours.token_f1 < 1.0 {
            partial += 1;
        }
    }
    assert!(
        partial >= 5,
        "too few cases with a partial score: {partial}"
    );
}
