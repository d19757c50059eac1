"""Small generated datasets for the example scripts' --tiny runs, in the layout the common
LLaVA guides use.

Usage:
  python example_data.py images DATA_DIR
      DATA_DIR/images/*.png (noise pictures of a few sizes) and
      DATA_DIR/annotations/train.json in LLaVA's `conversations` format, `<image>` in the
      first human turn.
  python example_data.py video DATA_DIR
      DATA_DIR/videos/*.y4m (4 frames of 56x56 at 2 fps each, uncompressed YUV4MPEG2, which
      ffmpeg reads without a codec) and DATA_DIR/annotations/train.json with a `video`
      entry and `<video>` in the first human turn.
"""

import json
import os
import sys

import numpy as np
from PIL import Image

ANSWERS = ["A red square.", "Blue stripes.", "A green circle.", "Grey noise."]


def images(data):
    os.makedirs(os.path.join(data, "images"), exist_ok=True)
    os.makedirs(os.path.join(data, "annotations"), exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i, (w, h) in enumerate([(100, 60), (56, 84), (70, 70), (90, 50)]):
        name = f"picture_{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(data, "images", name))
        records.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": ANSWERS[i]},
            {"from": "human", "value": "Describe it in one word."},
            {"from": "gpt", "value": ANSWERS[i].split()[-1].rstrip(".")},
        ]})
    with open(os.path.join(data, "annotations", "train.json"), "w") as f:
        json.dump(records, f, indent=1)


def write_y4m(path, frames, fps=2):
    """YUV4MPEG2, 4:4:4, full-range BT.601 (JPEG) conversion of RGB8 frames."""
    h, w = frames[0].shape[:2]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C444 XCOLORRANGE=FULL\n".encode())
        for rgb in frames:
            r, g, b = (rgb[..., c].astype(np.float64) for c in range(3))
            y = 0.299 * r + 0.587 * g + 0.114 * b
            u = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
            v = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
            f.write(b"FRAME\n")
            for plane in (y, u, v):
                f.write(np.clip(np.rint(plane), 0, 255).astype(np.uint8).tobytes())


def video(data):
    os.makedirs(os.path.join(data, "videos"), exist_ok=True)
    os.makedirs(os.path.join(data, "annotations"), exist_ok=True)
    rng = np.random.default_rng(1)
    records = []
    for i in range(4):
        name = f"clip_{i}.y4m"
        frames = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(4)]
        write_y4m(os.path.join(data, "videos", name), frames)
        records.append({"id": str(i), "video": name, "conversations": [
            {"from": "human", "value": "<video>\nWhat happens in the clip?"},
            {"from": "gpt", "value": ANSWERS[i]},
        ]})
    with open(os.path.join(data, "annotations", "train.json"), "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    {"images": images, "video": video}[sys.argv[1]](sys.argv[2])
