//! The quickstart demo end to end: a tiny Qwen2-VL trained from random weights on generated
//! pictures must answer held-out pictures with at least 90% accuracy (the demo itself fails
//! below that), and its loss must fall.

use std::process::Command;

#[test]
fn demo_learns_colours_and_shapes() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args(["demo", "--out", out.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary = stdout
        .lines()
        .find(|l| l.contains("held-out accuracy"))
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    // "demo: loss A → B; held-out accuracy C/D = E%; ..."
    let losses: Vec<f64> = summary["demo: loss ".len()..]
        .split(';')
        .next()
        .unwrap()
        .split(" → ")
        .map(|x| x.trim().parse().unwrap())
        .collect();
    assert!(losses[1] < losses[0] / 10.0, "loss did not fall: {summary}");
    let acc: f64 = summary
        .split(" = ")
        .nth(1)
        .and_then(|s| s.split('%').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(acc >= 90.0, "{summary}");
    assert!(out
        .path()
        .join("tiny-qwen2-vl-trained/model.safetensors")
        .is_file());
    assert!(out
        .path()
        .join("tiny-qwen2-vl-trained/tokenizer.json")
        .is_file());
    // The loss plot is a PNG, and metrics.jsonl has one row per step whose first and last
    // losses are the ones the summary printed (rounded to 3 decimals there).
    let trained = out.path().join("tiny-qwen2-vl-trained");
    let png = std::fs::read(trained.join("loss.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000,
        "loss.png is not a PNG"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(trained.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows.len() >= 10, "metrics.jsonl has {} rows", rows.len());
    let loss = |r: &serde_json::Value| r["loss"].as_f64().unwrap();
    assert!((loss(&rows[0]) - losses[0]).abs() <= 6e-4, "{:?}", rows[0]);
    assert!((loss(&rows[rows.len() - 1]) - losses[1]).abs() <= 6e-4);
    assert!(stdout.contains("loss plot in"), "{stdout}");
}
