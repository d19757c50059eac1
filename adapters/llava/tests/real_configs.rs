//! The real llava-hf `config.json` files in `shared/hf-configs` parse (they lean on
//! transformers' defaults: llava-1.5's `text_config` gives three keys) and give the parameter
//! count transformers reports for them on the meta device, computed without allocating.

use lmms_ft_core::family::HfConfig;
use lmms_ft_core::testing::{hf_configs, run_oracle};
use lmms_ft_llava::config::{LlavaConfig, SelectStrategy, VisionConfig};

fn parse(dir: &std::path::Path) -> LlavaConfig {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    LlavaConfig::from_hf_json(&serde_json::from_str(&text).unwrap()).unwrap()
}

#[test]
fn real_llava_configs_parse_and_count_like_transformers() {
    let dirs = [
        hf_configs().join("llava-hf--llava-1.5-7b-hf"),
        hf_configs().join("llava-hf--llava-interleave-qwen-7b-hf"),
    ];
    let args: Vec<&str> = dirs.iter().map(|d| d.to_str().unwrap()).collect();
    let oracle: serde_json::Value = serde_json::from_str(
        run_oracle("llava_param_count.py", &args)
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    for dir in &dirs {
        let config = parse(dir);
        let expected = oracle[dir.to_str().unwrap()].as_u64().unwrap();
        assert_eq!(config.num_parameters(), expected, "{}", dir.display());
    }

    // Spot checks of defaults that the counts alone would not pin down.
    let v15 = parse(&dirs[0]);
    assert_eq!(v15.text.decoder.num_layers, 32);
    assert_eq!(v15.text.decoder.rope_theta, 10000.0);
    assert_eq!(v15.text.decoder.rms_norm_eps, 1e-5);
    assert_eq!(v15.vision_feature_layers, vec![-2]);
    assert_eq!(v15.select_strategy, SelectStrategy::Default);
    assert_eq!(v15.tokens_per_tile(), 576);
    assert!(matches!(v15.vision, VisionConfig::Clip(_)));
    let interleave = parse(&dirs[1]);
    assert_eq!(interleave.text.decoder.rope_theta, 1e6);
    assert!(interleave.text.decoder.qkv_bias);
    assert_eq!(interleave.tokens_per_tile(), 729);
    assert!(matches!(interleave.vision, VisionConfig::Siglip(_)));
}

#[test]
fn bad_configs_are_errors_not_panics() {
    let bad = [
        serde_json::json!({"model_type": "qwen2_vl"}),
        serde_json::json!({"model_type": "llava", "vision_feature_select_strategy": "cls"}),
        serde_json::json!({"model_type": "llava", "text_config": {"model_type": "gemma"}}),
        serde_json::json!({"model_type": "llava", "vision_config": {"hidden_size": 100}}),
        serde_json::json!({"model_type": "llava", "text_config": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}),
        serde_json::json!({"model_type": "llava_next", "image_grid_pinpoints": [[336]]}),
        serde_json::json!({"model_type": "llava", "image_token_index": 99999}),
    ];
    for config in bad {
        assert!(
            LlavaConfig::from_hf_json(&config).is_err(),
            "accepted {config}"
        );
    }
}
