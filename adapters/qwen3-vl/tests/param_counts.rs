//! Parameter counts from config alone (no allocation) equal what `transformers` reports on
//! the meta device for the real Qwen3-VL-4B-Instruct config and for 2B / 8B / 32B configs
//! written from their published sizes (tied and untied embeddings).

use lmms_ft_core::family::HfConfig;
use lmms_ft_core::testing::{hf_configs, run_oracle};
use lmms_ft_qwen3_vl::config::Qwen3VlConfig;

#[test]
fn parameter_counts_match_transformers() {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs");
    let paths = [
        hf_configs().join("Qwen--Qwen3-VL-4B-Instruct/config.json"),
        here.join("qwen3-vl-2b-instruct.json"),
        here.join("qwen3-vl-8b-instruct.json"),
        here.join("qwen3-vl-32b-instruct.json"),
    ];
    let args: Vec<&str> = paths.iter().map(|p| p.to_str().unwrap()).collect();
    let counts: serde_json::Value =
        serde_json::from_str(run_oracle("param_count.py", &args).trim()).unwrap();
    for path in &paths {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let ours = Qwen3VlConfig::from_hf_json(&json).unwrap().num_parameters();
        let theirs = counts[path.to_str().unwrap()].as_u64().unwrap();
        assert_eq!(ours, theirs, "{}", path.display());
        eprintln!("{}: {ours} parameters", path.display());
    }
}
