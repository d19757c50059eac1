//! LLaVA-NeXT anyres geometry against transformers on the real llava-v1.6 geometry (336-pixel
//! tiles, patch 14, default pinpoints) over a sweep of image sizes, including extreme aspect
//! ratios: the chosen grid resolution (`select_best_resolution`) and the number of placeholder
//! tokens `LlavaNextProcessor` expands one `<image>` to, which the model's packed features
//! must equal. The same for OneVision's geometry (384-pixel tiles, 36 pinpoints,
//! `anyres_max_9`, whose feature budget downscales large images) and its video counts.

use lmms_ft_core::testing::run_oracle;
use lmms_ft_llava::anyres::{anyres_image_tokens, select_best_resolution, video_tokens, Tiling};

/// `(tile, grid, base tokens, anyres_max)` of the geometry the oracle is asked for.
fn check(args: &[&str], tile: i64, grid: i64, base: i64, max: Option<i64>) {
    let json: serde_json::Value = serde_json::from_str(
        run_oracle("llava_next_token_counts.py", args)
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    let pinpoints: Vec<[i64; 2]> = json["pinpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| [p[0].as_i64().unwrap(), p[1].as_i64().unwrap()])
        .collect();
    let cases = json["cases"].as_array().unwrap();
    assert!(cases.len() > 100);
    for case in cases {
        let v: Vec<i64> = case
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        let (size, best, tokens) = ([v[0], v[1]], [v[2], v[3]], v[4]);
        assert_eq!(
            select_best_resolution(size, &pinpoints),
            Some(best),
            "best resolution for {size:?}"
        );
        let tiling = Tiling::new(size, &pinpoints, tile).unwrap();
        assert_eq!(
            anyres_image_tokens(size, tiling, grid, base, max),
            tokens,
            "tokens for {size:?}"
        );
    }
    for case in json["video"].as_array().unwrap() {
        let (frames, tokens) = (case[0].as_i64().unwrap(), case[1].as_i64().unwrap());
        assert_eq!(video_tokens(frames, grid, None), tokens, "{frames} frames");
    }
}

#[test]
fn anyres_resolution_and_token_counts_match_transformers() {
    check(&[], 336, 24, 576, None);
}

#[test]
fn onevision_anyres_max_and_video_counts_match_transformers() {
    check(&["onevision"], 384, 27, 729, Some(9));
}
