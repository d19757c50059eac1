//! Learning-rate schedules against `transformers.get_scheduler` (cosine, linear,
//! constant-with-warmup) for several (total steps, warm-up ratio) cases, including ratios
//! whose product with the total is a hair above an integer in floating point (0.14 · 50,
//! 0.07 · 100), where `math.ceil` adds a step: our warm-up count and the lr multiplier of
//! every optimiser step must equal the oracle's (`scripts/oracle/train_schedule.py`).

use lmms_ft_core::config::Scheduler;
use lmms_ft_core::testing::run_oracle;
use lmms_ft_core::train::Schedule;

#[test]
fn schedules_match_transformers() {
    let cases: &[(Scheduler, &str, u64, f64)] = &[
        (Scheduler::Cosine, "cosine", 10, 0.03),
        (Scheduler::Cosine, "cosine", 10, 0.2),
        (Scheduler::Cosine, "cosine", 1, 0.5),
        (Scheduler::Cosine, "cosine", 100, 0.07),
        (Scheduler::Linear, "linear", 7, 0.5),
        (Scheduler::Linear, "linear", 50, 0.14),
        (Scheduler::Linear, "linear", 10, 0.99),
        (Scheduler::Constant, "constant", 5, 0.0),
        (Scheduler::Constant, "constant", 20, 0.15),
    ];
    let json: Vec<serde_json::Value> = cases
        .iter()
        .map(|(_, name, total, ratio)| {
            serde_json::json!({"kind": name, "total": total, "warmup_ratio": ratio})
        })
        .collect();
    let printed = run_oracle(
        "train_schedule.py",
        &[&serde_json::Value::Array(json).to_string()],
    );
    let oracle: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    // 0.14 · 50 and 0.07 · 100 round up to 8 warm-up steps, as in transformers.
    assert_eq!(oracle[5]["warmup"], 8);
    assert_eq!(oracle[3]["warmup"], 8);
    for (i, (kind, name, total, ratio)) in cases.iter().enumerate() {
        let ours = Schedule::with_ratio(*kind, *ratio, *total);
        assert_eq!(
            ours.warmup_steps,
            oracle[i]["warmup"].as_u64().unwrap(),
            "{name} total {total} ratio {ratio}: warm-up steps"
        );
        let lrs = oracle[i]["lr"].as_array().unwrap();
        assert_eq!(lrs.len() as u64, *total);
        for (s, lr) in lrs.iter().enumerate() {
            let (theirs, mine) = (lr.as_f64().unwrap(), ours.factor(s as u64));
            assert!(
                (theirs - mine).abs() <= 1e-12,
                "{name} total {total} ratio {ratio} step {s}: lr {mine} vs transformers {theirs}"
            );
        }
    }
}
