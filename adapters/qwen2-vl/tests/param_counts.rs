//! Parameter counts from config alone (no allocation) equal what `transformers` reports for
//! the real Qwen2.5-VL-3B / -7B configs and for Qwen2-VL-2B / -7B configs written from their
//! published sizes (flat and nested layouts).

use lmms_ft_core::family::HfConfig;
use lmms_ft_core::testing::{hf_configs, run_oracle};
use lmms_ft_qwen2_vl::config::Qwen2VlConfig;

#[test]
fn parameter_counts_match_transformers() {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs");
    let paths = [
        hf_configs().join("Qwen--Qwen2.5-VL-3B-Instruct/config.json"),
        hf_configs().join("Qwen--Qwen2.5-VL-7B-Instruct/config.json"),
        here.join("qwen2-vl-2b-instruct.json"),
        here.join("qwen2-vl-7b-instruct.json"),
    ];
    let args: Vec<&str> = paths.iter().map(|p| p.to_str().unwrap()).collect();
    let counts: serde_json::Value =
        serde_json::from_str(run_oracle("param_count.py", &args).trim()).unwrap();
    for path in &paths {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let ours = Qwen2VlConfig::from_hf_json(&json).unwrap().num_parameters();
        let theirs = counts[path.to_str().unwrap()].as_u64().unwrap();
        assert_eq!(ours, theirs, "{}", path.display());
        eprintln!("{}: {ours} parameters", path.display());
    }
}
