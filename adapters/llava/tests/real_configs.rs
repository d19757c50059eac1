//! The real llava-hf `config.json` files in `tests/data/hub` parse (they lean on
//! transformers' defaults: llava-1.5's `text_config` gives three keys) and give the parameter
//! count transformers reports for them on the meta device, computed without allocating.
//!
//! `tests/data/hub` has no LLaVA-NeXT-Video or OneVision config, so their 7B / 0.5B / 7B
//! configs are written here from the values the llava-hf Hub repos document (same keys,
//! including the ones transformers ignores), plus bare `{"model_type": ...}` forms that rest
//! on transformers' per-class defaults; each is counted by transformers and by us.

use lmms_ft_core::family::HfConfig;
use lmms_ft_core::testing::{hf_configs, run_oracle};
use lmms_ft_llava::config::{Architecture, LlavaConfig, PoolMode, SelectStrategy, VisionConfig};
use serde_json::{json, Value};

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

fn onevision_pinpoints() -> Value {
    let p: Vec<[i64; 2]> = (1..=6)
        .flat_map(|h| (1..=6).map(move |w| [384 * h, 384 * w]))
        .collect();
    json!(p)
}

/// `llava-hf/LLaVA-NeXT-Video-7B-hf`.
fn next_video_7b() -> Value {
    json!({
        "architectures": ["LlavaNextVideoForConditionalGeneration"],
        "ignore_index": -100,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "image_seq_length": 576,
        "image_token_index": 32001,
        "model_type": "llava_next_video",
        "projector_hidden_act": "gelu",
        "spatial_pool_mode": "average",
        "spatial_pool_stride": 2,
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0,
            "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064
        },
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "use_image_newline_parameter": true,
        "video_seq_length": 288,
        "video_token_index": 32000,
        "vision_config": {
            "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
            "model_type": "clip_vision_model", "num_attention_heads": 16,
            "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "vocab_size": 32000
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064
    })
}

/// `llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf`.
fn onevision(text: Value) -> Value {
    json!({
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "image_grid_pinpoints": onevision_pinpoints(),
        "image_token_index": 151646,
        "model_type": "llava_onevision",
        "projector_hidden_act": "gelu",
        "text_config": text,
        "torch_dtype": "float16",
        "use_image_newline_parameter": true,
        "video_token_index": 151647,
        "vision_aspect_ratio": "anyres_max_9",
        "vision_config": {
            "hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
            "model_type": "siglip_vision_model", "num_attention_heads": 16,
            "num_hidden_layers": 26, "patch_size": 14, "vision_use_head": false
        },
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full"
    })
}

fn onevision_05b() -> Value {
    onevision(json!({
        "_name_or_path": "Qwen/Qwen2-0.5B-Instruct", "architectures": ["Qwen2ForCausalLM"],
        "bos_token_id": 151643, "eos_token_id": 151645, "hidden_size": 896,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
        "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
        "num_key_value_heads": 2, "rope_theta": 1000000.0, "tie_word_embeddings": true,
        "torch_dtype": "bfloat16", "use_sliding_window": false, "vocab_size": 151936
    }))
}

fn onevision_7b() -> Value {
    onevision(json!({
        "_name_or_path": "Qwen/Qwen2-7B-Instruct", "architectures": ["Qwen2ForCausalLM"],
        "bos_token_id": 151643, "eos_token_id": 151645, "hidden_size": 3584,
        "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
        "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "rope_theta": 1000000.0, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16", "use_sliding_window": false, "vocab_size": 152064
    }))
}

#[test]
fn video_family_configs_count_like_transformers() {
    let configs = [
        ("next-video-7b", next_video_7b()),
        ("onevision-0.5b", onevision_05b()),
        ("onevision-7b", onevision_7b()),
        // transformers' bare defaults put `<image>` (32001) outside Llama's default vocabulary
        // of 32000, which we refuse; the real checkpoints' 32064 fixes that.
        (
            "next-video-defaults",
            json!({"model_type": "llava_next_video", "text_config": {"vocab_size": 32064}}),
        ),
        (
            "onevision-defaults",
            json!({"model_type": "llava_onevision"}),
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<std::path::PathBuf> = configs
        .iter()
        .map(|(name, config)| {
            let dir = tmp.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
            dir
        })
        .collect();
    let args: Vec<&str> = dirs.iter().map(|d| d.to_str().unwrap()).collect();
    let oracle: Value = serde_json::from_str(
        run_oracle("llava_param_count.py", &args)
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    for ((name, _), dir) in configs.iter().zip(&dirs) {
        let config = parse(dir);
        let expected = oracle[dir.to_str().unwrap()].as_u64().unwrap();
        assert_eq!(config.num_parameters(), expected, "{name}");
        eprintln!("{name}: {expected} parameters");
    }

    let nv = parse(&dirs[0]);
    assert_eq!(nv.architecture, Architecture::LlavaNextVideo);
    assert_eq!(nv.tokens_per_tile(), 576);
    assert_eq!(nv.video_pool, Some((PoolMode::Average, 2)));
    assert_eq!((nv.image_token_id, nv.video_token_id), (32001, Some(32000)));
    let ov = parse(&dirs[1]);
    assert_eq!(ov.architecture, Architecture::LlavaOnevision);
    assert_eq!(ov.tokens_per_tile(), 729);
    assert_eq!(ov.max_patches, Some(9));
    assert!(ov.text.decoder.tie_word_embeddings);
    assert_eq!(ov.image_grid_pinpoints.len(), 36);
    // The bare forms take each class's defaults: SigLIP-so400m + Qwen2 for OneVision.
    let bare = parse(&dirs[4]);
    assert!(matches!(bare.vision, VisionConfig::Siglip(_)));
    assert_eq!(bare.select_strategy, SelectStrategy::Full);
    assert_eq!(bare.vision_feature_layers, vec![-1]);
    assert_eq!(
        (bare.image_token_id, bare.video_token_id),
        (151646, Some(151647))
    );
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
        serde_json::json!({"model_type": "llava_next_video", "spatial_pool_mode": "conv"}),
        serde_json::json!({"model_type": "llava_next_video", "spatial_pool_stride": 0}),
        serde_json::json!({"model_type": "llava_next_video", "video_token_index": 40000}),
        serde_json::json!({"model_type": "llava_onevision", "vision_aspect_ratio": "pad"}),
        serde_json::json!({"model_type": "llava_onevision", "video_token_index": 151646}),
    ];
    for config in bad {
        assert!(
            LlavaConfig::from_hf_json(&config).is_err(),
            "accepted {config}"
        );
    }
}
