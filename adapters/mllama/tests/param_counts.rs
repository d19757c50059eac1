//! Parameter counts from config alone (no allocation) equal what `transformers` reports on
//! the meta device for the real Llama-3.2-11B-Vision-Instruct `config.json` and for the 90B
//! written from its published sizes.

use lmms_ft_core::family::HfConfig;
use lmms_ft_core::testing::{hf_configs, run_oracle};
use lmms_ft_mllama::config::MllamaConfig;

#[test]
fn parameter_counts_match_transformers() {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs");
    let paths = [
        hf_configs().join("meta-llama--Llama-3.2-11B-Vision-Instruct/config.json"),
        here.join("llama-3.2-90b-vision-instruct.json"),
    ];
    let args: Vec<&str> = paths.iter().map(|p| p.to_str().unwrap()).collect();
    let counts: serde_json::Value =
        serde_json::from_str(run_oracle("param_count.py", &args).trim()).unwrap();
    for path in &paths {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let config = MllamaConfig::from_hf_json(&json).unwrap();
        let ours = config.num_parameters();
        let theirs = counts[path.to_str().unwrap()].as_u64().unwrap();
        assert_eq!(ours, theirs, "{}", path.display());
        eprintln!("{}: {ours} parameters", path.display());
    }
    // The real 11B config as parsed: nested keys, llama3 rope, the cross-attention layers.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&paths[0]).unwrap()).unwrap();
    let c = MllamaConfig::from_hf_json(&json).unwrap();
    assert_eq!(
        c.text.cross_attention_layers,
        [3, 8, 13, 18, 23, 28, 33, 38]
    );
    assert_eq!(c.text.decoder.num_layers, 40);
    assert_eq!(c.text.rope_scaling.unwrap().factor, 8.0);
    assert_eq!(c.vision.intermediate_layers_indices, [3, 7, 15, 23, 30]);
    assert_eq!(c.vision.num_patches(), 1601);
    assert_eq!(c.vision.supported_aspect_ratios.len(), 8);
    assert_eq!(c.image_token_id, 128256);
}

#[test]
fn configs_of_other_models_are_refused() {
    let qwen: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(hf_configs().join("Qwen--Qwen2.5-VL-3B-Instruct/config.json"))
            .unwrap(),
    )
    .unwrap();
    let err = MllamaConfig::from_hf_json(&qwen).unwrap_err().to_string();
    assert!(err.contains("not a Llama-3.2-Vision config"), "{err}");
    let bad = serde_json::json!({
        "model_type": "mllama",
        "vision_config": {"hidden_size": 1280, "vision_output_dim": 1000}
    });
    let err = MllamaConfig::from_hf_json(&bad).unwrap_err().to_string();
    assert!(err.contains("vision_output_dim"), "{err}");
}
