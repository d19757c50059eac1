//! LLaVA-NeXT anyres geometry against transformers on the real llava-v1.6 geometry (336-pixel
//! tiles, patch 14, default pinpoints) over a sweep of image sizes, including extreme aspect
//! ratios: the chosen grid resolution (`select_best_resolution`) and the number of placeholder
//! tokens `LlavaNextProcessor` expands one `<image>` to, which the model's packed features
//! must equal.

use lmms_ft_core::testing::run_oracle;
use lmms_ft_llava::anyres::{next_image_tokens, select_best_resolution, Tiling};

#[test]
fn anyres_resolution_and_token_counts_match_transformers() {
    let json: serde_json::Value = serde_json::from_str(
        run_oracle("llava_next_token_counts.py", &[])
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
        let tiling = Tiling::new(size, &pinpoints, 336).unwrap();
        assert_eq!(
            next_image_tokens(size, tiling, 24, 576),
            tokens,
            "tokens for {size:?}"
        );
    }
}
