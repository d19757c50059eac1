"""Oracle for core/tests/media_images.rs and media_video.rs: what PIL / transformers / torch do.

Subcommands (all outputs go to OUTDIR, never into the repository):
  convert OUTDIR   image files in many modes + the RGB8 pixels transformers' processors see
                   (`convert_to_rgb(ImageOps.exif_transpose(Image.open(f)), return_numpy=True)`)
  resize OUTDIR    random-noise and smooth RGB sources + PIL's resize of them for several
                   sizes and filters (checked to equal transformers' `image_transforms.resize`)
  indices OUTDIR   uniform frame indices: torch `linspace(0, total-1, n).round()` (qwen-vl-utils)
                   and transformers' `default_sample_indices_fn`, for many (total, n)

Raw pixel files are HxWx3 uint8, row-major. Each subcommand writes OUTDIR/manifest.json.
"""

import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from transformers.image_transforms import convert_to_rgb

ORIENTATION_TAG = 0x0112


def write_rgb(path: Path, arr: np.ndarray) -> None:
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, arr.shape
    path.write_bytes(np.ascontiguousarray(arr).tobytes())


def transformers_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return convert_to_rgb(im, return_numpy=True)


def png16(path: Path, arr: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand: PIL cannot save 16-bit RGB/RGBA/LA."""
    h, w = arr.shape[:2]

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    be = arr.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + be[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def quadrants(w: int, h: int) -> Image.Image:
    """Four flat colours, so a rotation or flip is visible at the corners even after JPEG."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (230, 30, 30)
    a[: h // 2, w // 2 :] = (30, 220, 40)
    a[h // 2 :, : w // 2] = (40, 40, 230)
    a[h // 2 :, w // 2 :] = (240, 240, 40)
    return Image.fromarray(a)


def cmd_convert(out: Path) -> None:
    rng = np.random.default_rng(1234)
    cases = []

    def add(name: str, exact: bool, note: str = "", expected: np.ndarray | None = None):
        path = out / name
        pil = transformers_rgb(path)
        exp = pil if expected is None else expected
        write_rgb(out / (name + ".rgb"), exp)
        entry = {
            "file": name,
            "expected": name + ".rgb",
            "width": int(exp.shape[1]),
            "height": int(exp.shape[0]),
            "exact": exact,
            "note": note,
        }
        if expected is not None:
            # Record how far transformers' own result is from the expectation we test.
            entry["transformers_max_diff"] = int(np.abs(pil.astype(int) - exp.astype(int)).max())
        cases.append(entry)

    # Every (colour, alpha) pair: R runs over x, alpha over y.
    x = np.arange(256, dtype=np.uint8)
    xx, yy = np.meshgrid(x, x)
    rgba = np.stack([xx, 255 - xx, (xx.astype(np.int64) * 7) % 256, yy], -1).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(out / "rgba_all_pairs.png")
    add("rgba_all_pairs.png", True, "all 65536 (value, alpha) pairs over white")

    Image.fromarray(rng.integers(0, 256, (23, 37, 4), dtype=np.uint8), "RGBA").save(
        out / "rgba_noise.png"
    )
    add("rgba_noise.png", True)
    Image.fromarray(rng.integers(0, 256, (19, 29, 2), dtype=np.uint8), "LA").save(out / "la.png")
    add("la.png", True)
    Image.fromarray(rng.integers(0, 256, (17, 31), dtype=np.uint8), "L").save(out / "l.png")
    add("l.png", True)
    Image.fromarray(rng.integers(0, 2, (13, 21), dtype=np.uint8) * 255, "L").convert("1").save(
        out / "one_bit.png"
    )
    add("one_bit.png", True, "mode 1")

    palette = rng.integers(0, 256, 16 * 3, dtype=np.uint8).tolist()
    idx = rng.integers(0, 16, (21, 27), dtype=np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(palette)
    p.save(out / "p_opaque.png")
    add("p_opaque.png", True)
    p.save(out / "p_trns_index.png", transparency=3)
    add("p_trns_index.png", True, "palette with one transparent index")
    p.save(out / "p_trns_alpha.png", transparency=bytes(rng.integers(0, 256, 16, dtype=np.uint8)))
    add("p_trns_alpha.png", True, "palette with per-entry alpha")
    p.save(out / "p_trns.gif", transparency=5)
    add("p_trns.gif", True, "GIF with a transparent index")

    rgb = rng.integers(0, 4, (15, 19, 3), dtype=np.uint8) * 80
    Image.fromarray(rgb, "RGB").save(out / "rgb_trns.png", transparency=(80, 160, 0))
    add("rgb_trns.png", True, "RGB with a tRNS colour key")
    grey = rng.integers(0, 4, (15, 19), dtype=np.uint8) * 80
    Image.fromarray(grey, "L").save(out / "l_trns.png", transparency=160)
    add("l_trns.png", True, "grey with a tRNS key")

    a16 = rng.integers(0, 65536, (11, 13, 3), dtype=np.uint16)
    png16(out / "rgb16.png", a16, 2)
    add("rgb16.png", True, "16-bit RGB")
    a16 = rng.integers(0, 65536, (11, 13, 4), dtype=np.uint16)
    png16(out / "rgba16.png", a16, 6)
    add("rgba16.png", True, "16-bit RGBA")
    a16 = rng.integers(0, 65536, (11, 13, 2), dtype=np.uint16)
    png16(out / "la16.png", a16, 4)
    add("la16.png", True, "16-bit grey + alpha")
    g16 = rng.integers(0, 65536, (11, 13, 1), dtype=np.uint16)
    png16(out / "gray16.png", g16, 0)
    hi = np.repeat((g16 >> 8).astype(np.uint8), 3, axis=2)
    add(
        "gray16.png",
        True,
        "16-bit grey: PIL (I;16) clamps to 255; we deliberately take the high byte",
        expected=hi,
    )

    noise = rng.integers(0, 256, (14, 18, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    (out / "png_named.jpg").write_bytes(buf.getvalue())
    add("png_named.jpg", True, "PNG content under a .jpg name")
    Image.fromarray(noise).save(out / "rgb.bmp")
    add("rgb.bmp", True)
    Image.fromarray(rng.integers(0, 256, (14, 18, 4), dtype=np.uint8), "RGBA").save(
        out / "rgba_lossless.webp", lossless=True
    )
    add("rgba_lossless.webp", True, "lossless WebP with alpha")

    base = quadrants(48, 32)
    for k in range(1, 9):
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = k
        name = f"exif_orient_{k}.jpg"
        base.save(out / name, quality=95, exif=exif)
        add(name, False, f"JPEG with EXIF orientation {k}")
    base.convert("L").save(out / "grey.jpg", quality=95)
    add("grey.jpg", False, "greyscale JPEG")
    base.convert("CMYK").save(out / "cmyk.jpg", quality=95)
    add("cmyk.jpg", False, "CMYK JPEG")

    (out / "manifest.json").write_text(json.dumps({"cases": cases}, indent=1))


def cmd_resize(out: Path) -> None:
    from transformers.image_transforms import resize as hf_resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    rng = np.random.default_rng(99)
    sizes = [(500, 333), (640, 480), (100, 80), (1000, 10), (37, 23)]
    targets = {
        (500, 333): [(476, 308), (250, 166), (500, 300), (480, 333), (1001, 667), (490, 100)],
        (640, 480): [(224, 224), (336, 252), (640, 240), (600, 240)],
        (100, 80): [(336, 336), (101, 79), (28, 28)],
        (1000, 10): [(28, 28), (3, 1)],
        (37, 23): [(224, 224), (1, 1), (74, 46)],
    }
    filters = {
        "bicubic": Image.Resampling.BICUBIC,
        "bilinear": Image.Resampling.BILINEAR,
        "lanczos": Image.Resampling.LANCZOS,
        "nearest": Image.Resampling.NEAREST,
    }
    cases = []
    for w, h in sizes:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        smooth = np.stack(
            [
                127.5 + 127.5 * np.sin(xx / 17.0 + yy / 29.0),
                255.0 * xx / max(w - 1, 1),
                127.5 + 127.5 * np.cos(np.hypot(xx - w / 3, yy - h / 2) / 9.0),
            ],
            -1,
        )
        sources = {
            "noise": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            "smooth": np.clip(np.round(smooth), 0, 255).astype(np.uint8),
        }
        for kind, src in sources.items():
            src_name = f"src_{kind}_{w}x{h}.rgb"
            write_rgb(out / src_name, src)
            for tw, th in targets[(w, h)]:
                for fname, f in filters.items():
                    got = np.array(Image.fromarray(src).resize((tw, th), resample=f))
                    if fname in ("bicubic", "bilinear"):
                        via_hf = hf_resize(
                            src,
                            (th, tw),
                            resample=PILImageResampling(int(f)),
                            input_data_format=ChannelDimension.LAST,
                        )
                        assert np.array_equal(np.asarray(via_hf), got), "transformers != PIL"
                    name = f"out_{kind}_{w}x{h}_{tw}x{th}_{fname}.rgb"
                    write_rgb(out / name, got)
                    cases.append(
                        {
                            "source": src_name,
                            "src_width": w,
                            "src_height": h,
                            "width": tw,
                            "height": th,
                            "filter": fname,
                            "expected": name,
                        }
                    )
    (out / "manifest.json").write_text(json.dumps({"cases": cases}, indent=1))


def cmd_indices(out: Path) -> None:
    import torch
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    cases = []
    for total in [1, 2, 3, 7, 10, 29, 30, 31, 64, 97, 100, 300, 1001, 4500]:
        for n in sorted({1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 48, total // 2, total}):
            if n < 1 or n > total:
                continue
            lin = torch.linspace(0, total - 1, n).round().long().tolist()
            meta = VideoMetadata(total_num_frames=total, fps=25.0)
            floor = default_sample_indices_fn(meta, num_frames=n).tolist()
            cases.append({"total": total, "n": n, "linspace": lin, "floor": floor})
    (out / "manifest.json").write_text(json.dumps({"cases": cases}))


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("convert", "resize", "indices"):
        sys.exit(__doc__)
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    {"convert": cmd_convert, "resize": cmd_resize, "indices": cmd_indices}[sys.argv[1]](out)


if __name__ == "__main__":
    main()
