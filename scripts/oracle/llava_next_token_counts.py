"""LLaVA-NeXT placeholder counts per image size, from transformers' own processor logic.

Usage: python llava_next_token_counts.py

For the real llava-v1.6 geometry (336-pixel CLIP tiles, patch 14, the default
`image_grid_pinpoints`, "default" strategy with the CLS token counted then dropped) and a
sweep of image sizes, prints JSON: `{"pinpoints": [...], "cases": [[h, w, best_h, best_w,
tokens], ...]}` where `tokens` is what `LlavaNextProcessor` expands one `<image>` to.
"""

import json

from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


class _ImageProcessor:
    image_grid_pinpoints = pinpoints


# Only the counting methods are used; they read these attributes.
proc = LlavaNextProcessor.__new__(LlavaNextProcessor)
proc.image_processor = _ImageProcessor()
proc.patch_size = 14
proc.num_additional_image_tokens = 1
proc.vision_feature_select_strategy = "default"

sizes = [(h, w) for h in (1, 17, 100, 224, 335, 336, 337, 480, 500, 640, 672, 673, 1000, 1080, 2000)
         for w in (1, 33, 100, 250, 336, 333, 480, 640, 672, 999, 1008, 1920, 3000)]
cases = []
for h, w in sizes:
    best = select_best_resolution((h, w), pinpoints)
    tokens = proc._get_number_of_features(h, w, 336, 336)
    if proc.vision_feature_select_strategy == "default":
        tokens -= 1
    cases.append([h, w, best[0], best[1], tokens])
print(json.dumps({"pinpoints": pinpoints, "cases": cases}))
