"""Frame sizes transformers' Qwen3-VL video processor picks (`smart_resize` of
video_processing_qwen3_vl.py: the pixel budget bounds frames x height x width).

Usage: python qwen3_vl_resize.py  → one JSON line: [[frames, height, width, min, max, h, w], ...]
"""

import json

from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

cases = []
for frames in (2, 3, 4, 9, 32):
    for height, width in ((64, 64), (48, 64), (20, 90), (360, 640), (1080, 1920), (31, 700)):
        for lo, hi in ((4096, 25165824), (128 * 32 * 32, 32 * 32 * 768), (32 * 32, 32 * 32 * 16)):
            h, w = smart_resize(frames, height, width, temporal_factor=2, factor=32, min_pixels=lo, max_pixels=hi)
            cases.append([frames, height, width, lo, hi, h, w])
print(json.dumps(cases))
