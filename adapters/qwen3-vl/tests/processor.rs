//! Qwen3-VL's processor settings and video frame sizes:
//! - the real Qwen3-VL-4B-Instruct processor files give patch 16, mean / std 0.5, and the
//!   image and whole-clip video pixel budgets they state;
//! - the clip-wide `smart_resize` picks transformers' frame size (`scripts/oracle/
//!   qwen3_vl_resize.py`) for 90 cases: frame counts that round up or down to the temporal
//!   patch, frames smaller than one merge block, and budgets that bind from above, from
//!   below, or not at all;
//! - video timestamps are the middle of each temporal patch, as transformers computes them.

use lmms_ft_backbones::qwen_vl::processor::{
    smart_resize_clip, PixelBudget, QwenProcessor, VideoResize,
};
use lmms_ft_core::family::HfConfig;
use lmms_ft_core::testing::{hf_configs, run_oracle};
use lmms_ft_qwen3_vl::config::Qwen3VlConfig;
use lmms_ft_qwen3_vl::family::{frame_group_seconds, DEFAULTS};

#[test]
fn real_processor_files_are_read() {
    let dir = hf_configs().join("Qwen--Qwen3-VL-4B-Instruct");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let config = Qwen3VlConfig::from_hf_json(&json).unwrap();
    assert_eq!(config.vision.deepstack_visual_indexes, vec![5, 11, 17]);
    assert_eq!(config.mrope_section, [24, 20, 20]);
    assert!(config.text.tie_word_embeddings);
    assert_eq!(config.text.head_dim, 128);
    // The folder has no tokenizer.json (see its SOURCE.md), so the processor settings alone.
    let p = QwenProcessor::from_dir_with(&dir, &DEFAULTS).unwrap();
    assert_eq!(
        (p.patch_size, p.merge_size, p.temporal_patch_size),
        (16, 2, 2)
    );
    assert_eq!((p.mean, p.std), ([0.5; 3], [0.5; 3]));
    assert_eq!(
        p.image,
        PixelBudget {
            min_pixels: 65536,
            max_pixels: 16777216
        }
    );
    assert_eq!(
        p.video,
        PixelBudget {
            min_pixels: 4096,
            max_pixels: 25165824
        }
    );
    assert_eq!(p.video_resize, VideoResize::WholeClip);
}

#[test]
fn clip_resize_matches_transformers() {
    let cases: Vec<[u64; 7]> =
        serde_json::from_str(run_oracle("qwen3_vl_resize.py", &[]).trim()).unwrap();
    assert_eq!(cases.len(), 90);
    for [frames, height, width, min_pixels, max_pixels, h, w] in cases {
        let budget = PixelBudget {
            min_pixels,
            max_pixels,
        };
        let ours =
            smart_resize_clip(frames as u32, height as u32, width as u32, 2, 32, budget).unwrap();
        assert_eq!(
            ours,
            (h as u32, w as u32),
            "{frames} frames of {height}×{width} within {budget:?}"
        );
    }
    assert!(smart_resize_clip(
        1,
        64,
        64,
        2,
        32,
        PixelBudget {
            min_pixels: 1,
            max_pixels: 1 << 30
        }
    )
    .is_err());
}

#[test]
fn timestamps_are_temporal_patch_midpoints() {
    // transformers' _calculate_timestamps: frames 0..n at 1/fps, the last repeated to fill
    // the final patch, each patch at the mean of its first and last frame.
    assert_eq!(frame_group_seconds(4, 2.0, 2), vec![0.25, 1.25]);
    assert_eq!(frame_group_seconds(5, 1.0, 2), vec![0.5, 2.5, 4.0]);
    assert_eq!(frame_group_seconds(1, 24.0, 2), vec![0.0]);
}
