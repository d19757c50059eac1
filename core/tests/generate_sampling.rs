//! Sampling in `generate` against transformers' warpers (`scripts/oracle/generate_sampling.py`):
//! for several temperature / top-k / top-p settings, 20 000 seeded draws from
//! [`TokenPicker`] must never pick a token transformers gives zero probability, and every
//! token's frequency must be within 0.015 of transformers' probability (the binomial standard
//! deviation is at most 0.0035 at this count, so that is over 4σ while a wrong temperature or
//! cut-off moves some frequency by several times more). Greedy picks the first maximum, as
//! torch's argmax; a seed gives the same stream twice.

use lmms_ft_core::generate::{GenerateOptions, TokenPicker};
use lmms_ft_core::testing::run_oracle;
use tch::Tensor;

const DRAWS: usize = 20_000;

fn logits() -> Vec<f32> {
    (0..24)
        .map(|i| (i as f32 * 1.7).sin() * 2.5 + (i as f32 * 0.37).cos())
        .collect()
}

fn picker(temperature: f64, top_k: usize, top_p: f64, seed: u64) -> TokenPicker {
    TokenPicker::new(GenerateOptions {
        max_new_tokens: 1,
        temperature,
        top_k,
        top_p,
        seed,
    })
}

#[test]
fn sampling_matches_transformers_warpers() {
    let cases = [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.6)];
    let values = logits();
    let spec = serde_json::json!({
        "logits": values,
        "cases": cases.iter().map(|(t, k, p)| serde_json::json!({"temperature": t, "top_k": k, "top_p": p})).collect::<Vec<_>>(),
    });
    let printed = run_oracle("generate_sampling.py", &[&spec.to_string()]);
    let oracle: Vec<Vec<f64>> = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    let t = Tensor::from_slice(&values);
    for ((temperature, top_k, top_p), probs) in cases.iter().zip(&oracle) {
        let mut p = picker(*temperature, *top_k, *top_p, 1);
        let mut counts = vec![0usize; values.len()];
        for _ in 0..DRAWS {
            counts[p.pick(&t).unwrap() as usize] += 1;
        }
        let support = probs.iter().filter(|&&x| x > 0.0).count();
        assert!(
            support < values.len() || (*top_k == 0 && *top_p >= 1.0),
            "case {temperature}/{top_k}/{top_p} cuts nothing: the check would not see a wrong cut-off"
        );
        for (i, (&n, &prob)) in counts.iter().zip(probs).enumerate() {
            let freq = n as f64 / DRAWS as f64;
            if prob == 0.0 {
                assert_eq!(
                    n, 0,
                    "T {temperature} k {top_k} p {top_p}: token {i} drawn {n} times, transformers removes it"
                );
            }
            assert!(
                (freq - prob).abs() <= 0.015,
                "T {temperature} k {top_k} p {top_p}: token {i} frequency {freq:.4} vs transformers {prob:.4}"
            );
        }
        eprintln!("T {temperature} k {top_k} p {top_p}: {support} tokens kept, frequencies match");
    }
}

#[test]
fn greedy_takes_the_first_maximum_and_seeds_repeat() {
    let t = Tensor::from_slice(&[0.5f32, 2.0, -1.0, 2.0, 1.9]);
    assert_eq!(picker(0.0, 0, 1.0, 0).pick(&t).unwrap(), 1);
    let values = logits();
    let t = Tensor::from_slice(&values);
    let draw = |seed| {
        let mut p = picker(1.0, 0, 0.9, seed);
        (0..50).map(|_| p.pick(&t).unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(draw(3), draw(3));
    assert_ne!(draw(3), draw(4));
}
