"""LLaVA-NeXT placeholder counts per image size, from transformers' own processor logic.

Usage: python llava_next_token_counts.py [onevision]

For the real llava-v1.6 geometry (336-pixel CLIP tiles, patch 14, the default
`image_grid_pinpoints`, "default" strategy with the CLS token counted then dropped) and a
sweep of image sizes, prints JSON: `{"pinpoints": [...], "cases": [[h, w, best_h, best_w,
tokens], ...]}` where `tokens` is what `LlavaNextProcessor` expands one `<image>` to.

With `onevision`: the real llava-onevision geometry instead (384-pixel SigLIP tiles, patch 14,
729 tokens a tile, the 36 default pinpoints, `anyres_max_9`), counted by
`LlavaOnevisionProcessor` for a single image, plus `"video": [[frames, tokens], ...]`.
"""

import sys

import json

from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


class _ImageProcessor:
    image_grid_pinpoints = pinpoints


# Only the counting methods are used; they read these attributes.
proc = LlavaNextProcessor.__new__(LlavaNextProcessor)
proc.image_processor = _ImageProcessor()
proc.patch_size = 14
proc.num_additional_image_tokens = 1
proc.vision_feature_select_strategy = "default"

video = []
if sys.argv[1:] == ["onevision"]:
    pinpoints = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]
    _ImageProcessor.image_grid_pinpoints = pinpoints
    proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    proc.image_processor = _ImageProcessor()
    proc.num_image_tokens = 729
    proc.vision_feature_select_strategy = "full"
    proc.vision_aspect_ratio = "anyres_max_9"
    tile = 384
    video = [[f, proc._get_num_multimodal_tokens(video_sizes=[(f, 384, 384)])["num_video_tokens"][0]]
             for f in (1, 2, 8, 16, 32)]
else:
    tile = 336

sizes = [(h, w) for h in (1, 17, 100, 224, 335, 336, 337, 480, 500, 640, 672, 673, 1000, 1080, 2000, 4000)
         for w in (1, 33, 100, 250, 336, 333, 480, 640, 672, 999, 1008, 1920, 3000, 5000)]
cases = []
for h, w in sizes:
    best = select_best_resolution((h, w), pinpoints)
    tokens = proc._get_number_of_features(h, w, tile, tile)
    if proc.vision_feature_select_strategy == "default":
        tokens -= 1
    cases.append([h, w, best[0], best[1], tokens])
print(json.dumps({"pinpoints": pinpoints, "cases": cases, "video": video}))
