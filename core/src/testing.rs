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
