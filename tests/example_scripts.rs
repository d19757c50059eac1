//! Every script in `example_scripts/` runs end to end with `--tiny` (tiny random models that
//! transformers writes, generated data, the real `lmms-ft` binary), prints where its outputs
//! went on its last line, and leaves there what its workflow promises. One test per script,
//! so the harness runs them side by side.

use std::path::{Path, PathBuf};
use std::process::Command;

use lmms_ft_core::testing::{oracle_python, repo_root};

/// Runs `example_scripts/NAME.sh --tiny` with its run directory in a temp dir; returns the
/// run directory (kept alive by the returned guard) and the paths its last line names.
fn run_script(name: &str) -> (tempfile::TempDir, PathBuf, Vec<PathBuf>) {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let script = repo_root()
        .join("example_scripts")
        .join(format!("{name}.sh"));
    let out = Command::new("bash")
        .arg(&script)
        .arg("--tiny")
        .current_dir(tmp.path())
        .env("LMMS_FT", env!("CARGO_BIN_EXE_lmms-ft"))
        .env("LMMS_FT_PYTHON", oracle_python())
        .env("RUN_DIR", &run)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name}.sh --tiny failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("==> done:"),
        "{name}: the last line should say where the outputs went, got {last:?}"
    );
    let named: Vec<PathBuf> = last
        .split_whitespace()
        .map(|w| w.trim_end_matches([';', ',', ')']))
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect();
    assert!(!named.is_empty(), "{name}: no output path in {last:?}");
    for p in &named {
        assert!(
            p.starts_with(&run) && p.exists(),
            "{name}: printed output {} does not exist under {}",
            p.display(),
            run.display()
        );
    }
    (tmp, run, named)
}

fn json(path: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn tensor_names(path: &Path) -> Vec<String> {
    tch::Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn llava_custom_data() {
    let (_tmp, run, _) = run_script("llava-custom-data");
    let adapter = run.join("llava-1.5-lora");
    let names = tensor_names(&adapter.join("adapter_model.safetensors"));
    assert!(names.iter().any(|n| n.contains("lora_A")), "{names:?}");
    // LLaVA's --tune_mm_mlp_adapter: the projector travels with the adapter.
    assert!(
        names.iter().any(|n| n.contains("multi_modal_projector")),
        "{names:?}"
    );
    assert!(run.join("data/my_dataset/annotations/train.json").is_file());
}

/// Stage 1 and stage 2 outputs are standard LLaVA directories built on `tower`.
fn check_two_stages(run: &Path, tower: &str) {
    for stage in ["stage1", "stage2"] {
        let config = json(&run.join(stage).join("config.json"));
        assert_eq!(config["architectures"][0], "LlavaForConditionalGeneration");
        assert_eq!(config["vision_config"]["model_type"], tower, "{stage}");
        assert!(run.join(stage).join("model.safetensors").is_file());
    }
}

#[test]
fn build_llava_llama3_2_siglip() {
    let (_tmp, run, _) = run_script("build-llava-llama3.2-siglip");
    check_two_stages(&run, "siglip_vision_model");
}

#[test]
fn build_llava_qwen2_5_chinese_clip() {
    let (_tmp, run, _) = run_script("build-llava-qwen2.5-chinese-clip");
    check_two_stages(&run, "chinese_clip_vision_model");
}

#[test]
fn qwen2_vl_video_lora() {
    let (_tmp, run, _) = run_script("qwen2-vl-video-lora");
    let adapter = run.join("qwen2-vl-video-lora");
    assert!(adapter.join("adapter_model.safetensors").is_file());
    assert!(run.join("data/my_videos/videos/clip_0.y4m").is_file());
}

#[test]
fn qlora_7b() {
    let (_tmp, run, _) = run_script("qlora-7b");
    let adapter = json(&run.join("qwen2.5-vl-7b-qlora/adapter_config.json"));
    assert_eq!(adapter["r"], 16, "{adapter}");
    assert!(run.join("qwen2.5-vl-7b-merged/model.safetensors").is_file());
}
