//! Answer metrics for `evaluate --generate`: exact match and token F1 as the SQuAD v2
//! evaluation script defines them (after its answer normalisation), and ROUGE-L F1 as
//! Google's `rouge_score` computes it (LCS over lower-cased alphanumeric tokens, no
//! stemming). No maintained Rust crate implements these; they are a few lines each and are
//! checked against the Python references in `core/tests/text_metrics.rs`.
//!
//! `rouge_score`'s tokenizer drops every character outside `[a-z0-9]`, which scores any
//! non-English answer 0; here letters and digits of every script count, which equals
//! `rouge_score` on ASCII text.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;
use serde::Serialize;

/// Scores of one prediction against its reference, each in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Scores {
    pub exact_match: f64,
    pub token_f1: f64,
    pub rouge_l: f64,
}

impl Scores {
    pub fn of(prediction: &str, reference: &str) -> Scores {
        Scores {
            exact_match: exact_match(prediction, reference),
            token_f1: token_f1(prediction, reference),
            rouge_l: rouge_l(prediction, reference),
        }
    }

    /// Unweighted mean over samples (each sample counts once, as in SQuAD).
    pub fn mean(all: &[Scores]) -> Scores {
        let n = all.len().max(1) as f64;
        let sum = |f: fn(&Scores) -> f64| all.iter().map(f).sum::<f64>() / n;
        Scores {
            exact_match: sum(|s| s.exact_match),
            token_f1: sum(|s| s.token_f1),
            rouge_l: sum(|s| s.rouge_l),
        }
    }
}

/// SQuAD's `normalize_answer`: lower case, ASCII punctuation removed, the articles a / an /
/// the removed, whitespace collapsed.
pub fn normalize_answer(text: &str) -> String {
    static ARTICLES: OnceLock<Regex> = OnceLock::new();
    let articles = ARTICLES.get_or_init(|| Regex::new(r"\b(a|an|the)\b").expect("valid regex"));
    let no_punct: String = text
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    articles
        .replace_all(&no_punct, " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// 1 when the normalised texts are equal, else 0.
pub fn exact_match(prediction: &str, reference: &str) -> f64 {
    f64::from(u8::from(
        normalize_answer(prediction) == normalize_answer(reference),
    ))
}

/// Harmonic mean of token precision and recall over the normalised words (a multiset
/// intersection); two empty answers agree fully, one empty answer scores 0.
pub fn token_f1(prediction: &str, reference: &str) -> f64 {
    let pred = normalize_answer(prediction);
    let gold = normalize_answer(reference);
    let pred: Vec<&str> = pred.split_whitespace().collect();
    let gold: Vec<&str> = gold.split_whitespace().collect();
    if pred.is_empty() || gold.is_empty() {
        return f64::from(u8::from(pred == gold));
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in &gold {
        *counts.entry(w).or_default() += 1;
    }
    let mut same = 0usize;
    for w in &pred {
        if let Some(c) = counts.get_mut(w) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    f1(same, pred.len(), gold.len())
}

/// `rouge_score`'s tokens: lower case, split at every character that is not a letter or
/// digit.
fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// ROUGE-L F1: the longest common subsequence of the two token lists against each length;
/// 0 when either has no token.
pub fn rouge_l(prediction: &str, reference: &str) -> f64 {
    let pred = rouge_tokens(prediction);
    let gold = rouge_tokens(reference);
    if pred.is_empty() || gold.is_empty() {
        return 0.0;
    }
    // One row of the LCS table at a time.
    let mut prev = vec![0usize; gold.len() + 1];
    let mut row = vec![0usize; gold.len() + 1];
    for p in &pred {
        for (j, g) in gold.iter().enumerate() {
            row[j + 1] = if p == g {
                prev[j] + 1
            } else {
                row[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut row);
    }
    f1(prev[gold.len()], pred.len(), gold.len())
}

fn f1(same: usize, predicted: usize, reference: usize) -> f64 {
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / predicted as f64;
    let recall = same as f64 / reference as f64;
    2.0 * precision * recall / (precision + recall)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cases worked out by hand from the definitions.
    #[test]
    fn hand_computed_cases() {
        assert_eq!(normalize_answer("The  Cat, sat!"), "cat sat");
        assert_eq!(exact_match("A red square.", "red square"), 1.0);
        assert_eq!(exact_match("red squares", "red square"), 0.0);
        // pred {red, big, square}, gold {red, square}: P = 2/3, R = 1, F1 = 0.8.
        assert!((token_f1("big red square", "the red square") - 0.8).abs() < 1e-12);
        // Repeated words count once per occurrence: pred {red, red}, gold {red}: P 1/2, R 1.
        assert!((token_f1("red red", "red") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(token_f1("", ""), 1.0);
        assert_eq!(token_f1("the", "red"), 0.0);
        // LCS of [a b c d] and [a c b d] is 3: P = R = 3/4.
        assert!((rouge_l("a b c d", "a c b d") - 0.75).abs() < 1e-12);
        // Articles stay in ROUGE (no SQuAD normalisation): [the cat sat] vs [the cat was
        // sat]: LCS 3, P 1, R 3/4, F1 6/7.
        assert!((rouge_l("The cat sat", "the cat was sat.") - 6.0 / 7.0).abs() < 1e-12);
        assert_eq!(rouge_l("", "cat"), 0.0);
        assert_eq!(rouge_l("Ünïcode wörds", "ünïcode wörds"), 1.0);
    }
}
