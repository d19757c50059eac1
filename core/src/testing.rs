//! Helpers for tests that compare against the Python oracle (pinned `transformers`, `peft`,
//! PIL) — shared so every suite finds the interpreter and the real Hub configs the same way.
//! A missing oracle is a failure with instructions, never a silent skip.

pub mod generation;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The oracle interpreter: `$LMMS_FT_PYTHON`, else the venv `scripts/setup.sh` creates.
pub fn oracle_python() -> PathBuf {
    if let Some(p) = std::env::var_os("LMMS_FT_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("LMMS_FT_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lmms-ft")))
        .unwrap_or_default();
    let venv = std::env::var_os("LMMS_FT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join("venv"));
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "no Python oracle: set LMMS_FT_PYTHON or run scripts/setup.sh to create {}",
        python.display()
    );
    python
}

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("core/ has a parent")
        .to_path_buf()
}

/// `tests/data/hub`: the real Hub configuration files the tests read, copied into the
/// repository (with their provenance) so a bare clone passes the suite.
pub fn hf_configs() -> PathBuf {
    let dir = repo_root().join("tests/data/hub");
    assert!(
        dir.is_dir(),
        "{} is missing from the checkout",
        dir.display()
    );
    dir
}

/// Runs `scripts/oracle/<script>` with `args`; panics with its stderr if it fails, returns
/// its stdout.
pub fn run_oracle(script: &str, args: &[&str]) -> String {
    let path = repo_root().join("scripts/oracle").join(script);
    let out = Command::new(oracle_python())
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The fixture `scripts/oracle/<script> OUT VARIANT HF_CONFIGS` writes (a tiny checkpoint
/// and reference outputs), and what the script printed. Each (script version, variant) is
/// made once and then reused by every test binary and run, from a cache under the system temp
/// dir: fixtures take seconds to make and some hundred MB each, and tests only read them.
/// The scripts seed everything, so a cached fixture is the one the script would write now.
/// Concurrent makers (parallel test binaries) each write a private directory and rename it
/// into place; the first rename wins and the others use it.
pub fn cached_fixture(script: &str, variant: &str) -> (PathBuf, String) {
    use std::hash::{Hash, Hasher};
    let path = repo_root().join("scripts/oracle").join(script);
    let source = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (source, variant, oracle_python()).hash(&mut hasher);
    let stem = format!("{}-{variant}-", script.trim_end_matches(".py"));
    let root = std::env::temp_dir().join("lmms-ft-fixtures");
    let dir = root.join(format!("{stem}{:016x}", hasher.finish()));
    let printed = dir.join("oracle-stdout.txt");
    if let Ok(text) = std::fs::read_to_string(&printed) {
        return (dir, text);
    }
    std::fs::create_dir_all(&root).expect("creating the fixture cache");
    // Versions made by older scripts are not used again; a day's grace keeps the ones that
    // other checkouts (branches with other script versions) may be reading right now.
    let day = std::time::Duration::from_secs(24 * 3600);
    for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > day));
        if name.starts_with(&stem) && entry.path() != dir && stale {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let scratch = root.join(format!(".making-{}-{nanos}", std::process::id()));
    let out = scratch.join("fixture");
    let text = run_oracle(
        script,
        &[
            out.to_str().unwrap(),
            variant,
            hf_configs().to_str().unwrap(),
        ],
    );
    std::fs::write(out.join("oracle-stdout.txt"), &text).expect("writing the oracle output");
    let moved = std::fs::rename(&out, &dir);
    let _ = std::fs::remove_dir_all(&scratch);
    if moved.is_err() && !printed.is_file() {
        panic!("cannot move the fixture into {}", dir.display());
    }
    (dir, text)
}

/// Checks an `lmms-ft evaluate --json` report of the fixture's `samples` (in that order)
/// against the oracle's `reference.json` / `reference.safetensors` in `fixture`: each loss
/// under the label rule (≤ 1e-5 relative), each label count after the causal shift (counted
/// from the oracle's labels), and the token-weighted mean. `what` names the case in failures.
pub fn assert_evaluate_report(fixture: &Path, report: &Path, samples: &[&str], what: &str) {
    let read_json = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let meta = read_json(&fixture.join("reference.json"));
    let report = read_json(report);
    let reference: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(fixture.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let (mut weighted, mut tokens) = (0.0, 0i64);
    for (i, name) in samples.iter().enumerate() {
        let row = &report["samples"][i];
        assert_eq!(row["index"], i, "{what}/{name}");
        let expected = meta["samples"][name]["rule_loss"].as_f64().unwrap();
        let loss = row["loss"].as_f64().unwrap();
        assert!(
            ((loss - expected) / expected).abs() <= 1e-5,
            "{what}/{name}: {loss} vs {expected}"
        );
        let labels: Vec<i64> =
            Vec::try_from(reference[&format!("{name}.rule_labels")].flatten(0, -1)).unwrap();
        let n = labels.iter().skip(1).filter(|&&l| l != -100).count() as i64;
        assert_eq!(row["num_label_tokens"], n, "{what}/{name}");
        eprintln!("{what}/{name}: loss {loss:.6} vs {expected:.6}, {n} label tokens");
        weighted += expected * n as f64;
        tokens += n;
    }
    let mean = report["mean_loss"].as_f64().unwrap();
    assert!(
        (mean - weighted / tokens as f64).abs() <= 1e-5 * mean,
        "{what}: mean {mean}"
    );
}

/// Maximum absolute difference of two tensors (as f64), after checking shapes agree.
pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Chat messages as the oracle scripts write them (`{"role", "content": [{"type": "text" |
/// "image" | "video", ...}]}`) turned into a conversation, media numbered in order.
pub fn conversation_from_messages(messages: &serde_json::Value) -> crate::data::Conversation {
    use crate::data::{Conversation, Part, Role, Turn};
    let (mut images, mut videos) = (0, 0);
    let turns = messages
        .as_array()
        .expect("messages is a list")
        .iter()
        .map(|m| {
            let role = match m["role"].as_str() {
                Some("system") => Role::System,
                Some("user") => Role::User,
                _ => Role::Assistant,
            };
            let parts = m["content"]
                .as_array()
                .expect("content is a list")
                .iter()
                .map(|p| match p["type"].as_str() {
                    Some("image") => {
                        images += 1;
                        Part::Image { index: images - 1 }
                    }
                    Some("video") => {
                        videos += 1;
                        Part::Video { index: videos - 1 }
                    }
                    _ => Part::Text {
                        text: p["text"].as_str().unwrap_or_default().to_string(),
                    },
                })
                .collect();
            Turn { role, parts }
        })
        .collect();
    Conversation { turns }
}

/// The same messages as a LLaVA-format dataset record with `<image>` placeholders.
pub fn llava_record(messages: &serde_json::Value, images: &[&str]) -> serde_json::Value {
    let mut record = serde_json::json!({ "conversations": [] });
    for m in messages.as_array().expect("messages is a list") {
        let text: String = m["content"]
            .as_array()
            .expect("content is a list")
            .iter()
            .map(|p| match p["type"].as_str() {
                Some("image") => "<image>".to_string(),
                _ => p["text"].as_str().unwrap_or_default().to_string(),
            })
            .collect();
        match m["role"].as_str() {
            Some("system") => record["system_prompt"] = text.into(),
            role => {
                let from = if role == Some("user") { "human" } else { "gpt" };
                record["conversations"]
                    .as_array_mut()
                    .expect("just made")
                    .push(serde_json::json!({"from": from, "value": text}));
            }
        }
    }
    if !images.is_empty() {
        record["image"] = serde_json::json!(images);
    }
    record
}
