//! Helpers for tests that compare against the Python oracle (pinned `transformers`, `peft`,
//! PIL) — shared so every suite finds the interpreter and the real Hub configs the same way.
//! A missing oracle is a failure with instructions, never a silent skip.

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

/// `../shared/hf-configs` beside the checkout: the real Hub configuration files.
pub fn hf_configs() -> PathBuf {
    let dir = repo_root().join("../shared/hf-configs");
    assert!(
        dir.is_dir(),
        "{} is missing: the checkout needs the project's shared/ folder beside it",
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
