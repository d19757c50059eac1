//! Image decoding and resizing against the Python oracle (`scripts/oracle/images.py`):
//! RGB conversion as transformers' processors do it, PIL's resampling, and the error paths.

use std::path::Path;
use std::process::Command;

use lmms_ft_core::data::media::{
    load_image, load_image_from_bytes, resize, ImageError, ImageLimits, ResampleFilter,
    DEFAULT_MAX_IMAGE_PIXELS,
};
use lmms_ft_core::data::RgbImage;
use serde_json::Value;

/// Runs `images.py <cmd> <dir>` and returns the manifest it wrote.
fn oracle(cmd: &str, dir: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/oracle/images.py");
    let out = Command::new(lmms_ft_core::testing::oracle_python())
        .arg(&script)
        .arg(cmd)
        .arg(dir)
        .output()
        .expect("cannot run the Python oracle (run scripts/setup.sh)");
    assert!(
        out.status.success(),
        "oracle {cmd} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

fn raw_rgb(path: &Path, w: u32, h: u32) -> RgbImage {
    RgbImage::from_raw(w, h, std::fs::read(path).unwrap()).expect("raw size")
}

fn max_diff(a: &RgbImage, b: &RgbImage) -> (u8, usize) {
    let mut max = 0u8;
    let mut n = 0;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        n += usize::from(d != 0);
    }
    (max, n)
}

const RED: [u8; 3] = [230, 30, 30];
const GREEN: [u8; 3] = [30, 220, 40];
const BLUE: [u8; 3] = [40, 40, 230];
const YELLOW: [u8; 3] = [240, 240, 40];

/// Corner colours (TL, TR, BL, BR) of the oracle's quadrant image once displayed with EXIF
/// orientation `k`, worked out by hand from the EXIF definition.
fn upright_corners(k: u64) -> [[u8; 3]; 4] {
    match k {
        1 => [RED, GREEN, BLUE, YELLOW],
        2 => [GREEN, RED, YELLOW, BLUE], // mirrored left-right
        3 => [YELLOW, BLUE, GREEN, RED], // rotated 180
        4 => [BLUE, YELLOW, RED, GREEN], // mirrored top-bottom
        5 => [RED, BLUE, GREEN, YELLOW], // transposed
        6 => [BLUE, RED, YELLOW, GREEN], // rotated 90 clockwise
        7 => [YELLOW, GREEN, BLUE, RED], // transversed
        8 => [GREEN, YELLOW, RED, BLUE], // rotated 90 counter-clockwise
        _ => unreachable!(),
    }
}

#[test]
fn rgb_conversion_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = oracle("convert", dir.path());
    let limits = ImageLimits::default();
    let mut jpeg_max = 0u8;
    for case in manifest["cases"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        let (w, h) = (
            case["width"].as_u64().unwrap() as u32,
            case["height"].as_u64().unwrap() as u32,
        );
        let got =
            load_image(&dir.path().join(file), &limits).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(got.dimensions(), (w, h), "{file}: size");
        let want = raw_rgb(&dir.path().join(case["expected"].as_str().unwrap()), w, h);
        let (max, count) = max_diff(&got, &want);
        if case["exact"].as_bool().unwrap() {
            assert_eq!(
                (max, count),
                (0, 0),
                "{file} ({}): pixels differ from transformers",
                case["note"]
            );
            continue;
        }
        // JPEG: decoders may differ in IDCT / upsampling, but only slightly.
        jpeg_max = jpeg_max.max(max);
        assert!(max <= 12, "{file}: max diff {max} from PIL's JPEG decode");
        if let Some(k) = file
            .strip_prefix("exif_orient_")
            .and_then(|s| s.strip_suffix(".jpg"))
        {
            let k: u64 = k.parse().unwrap();
            let corners = [(2, 2), (w - 3, 2), (2, h - 3), (w - 3, h - 3)];
            for ((x, y), colour) in corners.into_iter().zip(upright_corners(k)) {
                let px = got.get_pixel(x, y).0;
                let off = px.iter().zip(colour).map(|(a, b)| a.abs_diff(b)).max();
                assert!(
                    off.unwrap() <= 12,
                    "{file}: corner ({x},{y}) is {px:?}, expected {colour:?}"
                );
            }
        }
    }
    eprintln!("JPEG max abs diff against PIL: {jpeg_max}");
}

#[test]
fn resize_matches_pil() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = oracle("resize", dir.path());
    let mut worst: std::collections::BTreeMap<String, (u8, usize, usize)> = Default::default();
    for case in manifest["cases"].as_array().unwrap() {
        let g = |k: &str| case[k].as_u64().unwrap() as u32;
        let src = raw_rgb(
            &dir.path().join(case["source"].as_str().unwrap()),
            g("src_width"),
            g("src_height"),
        );
        let want = raw_rgb(
            &dir.path().join(case["expected"].as_str().unwrap()),
            g("width"),
            g("height"),
        );
        let name = case["filter"].as_str().unwrap();
        let filter = match name {
            "bicubic" => ResampleFilter::Bicubic,
            "bilinear" => ResampleFilter::Bilinear,
            "lanczos" => ResampleFilter::Lanczos,
            "nearest" => ResampleFilter::Nearest,
            other => panic!("unknown filter {other}"),
        };
        let got = resize(&src, g("width"), g("height"), filter).unwrap();
        let (max, count) = max_diff(&got, &want);
        assert!(
            max <= 1,
            "{}: max diff {max} ({count} values differ)",
            case["expected"]
        );
        let e = worst.entry(name.to_string()).or_default();
        *e = (e.0.max(max), e.1 + count, e.2 + got.as_raw().len());
    }
    for (filter, (max, count, total)) in &worst {
        eprintln!("resize {filter}: max abs diff {max}, {count} of {total} values differ");
    }
    assert_eq!(worst.len(), 4);
}

#[test]
fn resize_rejects_empty_sizes() {
    let img = RgbImage::new(4, 4);
    assert!(resize(&img, 0, 3, ResampleFilter::Bicubic).is_err());
    assert!(resize(&RgbImage::new(0, 3), 2, 2, ResampleFilter::Bilinear).is_err());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn chunk(out: &mut Vec<u8>, tag: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(tag);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A PNG whose header declares `w`×`h` RGB pixels, followed by a token IDAT: the shape of a
/// decompression bomb without its payload.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    // zlib stream of a single empty stored block.
    chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x01, 0x01, 0x00, 0x00, 0xFF, 0xFF, 0, 0, 0, 1],
    );
    chunk(&mut png, b"IEND", &[]);
    png
}

fn small_png(w: u32, h: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    buf.into_inner()
}

#[test]
fn decompression_bombs_are_refused_before_decoding() {
    assert_eq!(DEFAULT_MAX_IMAGE_PIXELS, 178_956_970);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.png");
    std::fs::write(&path, png_header_only(20_000, 20_000)).unwrap();
    let t = std::time::Instant::now();
    let err = load_image(&path, &ImageLimits::default()).unwrap_err();
    assert!(
        t.elapsed().as_secs_f64() < 2.0,
        "the refusal must not decode"
    );
    match &err {
        ImageError::TooLarge {
            width,
            height,
            pixels,
            limit,
            ..
        } => {
            assert_eq!((*width, *height, *pixels), (20_000, 20_000, 400_000_000));
            assert_eq!(*limit, DEFAULT_MAX_IMAGE_PIXELS);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("bomb.png") && msg.contains("exceeds the limit"),
        "{msg}"
    );

    // The limit is configurable and inclusive.
    let png = small_png(20, 20);
    let tight = ImageLimits { max_pixels: 399 };
    assert!(matches!(
        load_image_from_bytes(&png, "mem", &tight),
        Err(ImageError::TooLarge { pixels: 400, .. })
    ));
    let exact = ImageLimits { max_pixels: 400 };
    let img = load_image_from_bytes(&png, "mem", &exact).unwrap();
    assert_eq!(img.get_pixel(5, 9).0, [5, 9, 7]);
}

#[test]
fn bad_files_give_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ImageLimits::default();

    let missing = dir.path().join("nope.png");
    let err = load_image(&missing, &limits).unwrap_err();
    assert!(matches!(err, ImageError::Missing { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.png"));
    assert!(err.to_string().contains("not found"));

    let text = dir.path().join("notes.jpg");
    std::fs::write(&text, "this is not an image at all").unwrap();
    let err = load_image(&text, &limits).unwrap_err();
    assert!(
        matches!(err, ImageError::UnsupportedFormat { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("notes.jpg"));

    let png = small_png(64, 64);
    let cut = dir.path().join("cut.png");
    std::fs::write(&cut, &png[..png.len() / 2]).unwrap();
    let err = load_image(&cut, &limits).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("cut.png") && err.to_string().contains("corrupt"));

    let mut garbled = png.clone();
    let n = garbled.len();
    for b in &mut garbled[60..n - 20] {
        *b = b.wrapping_mul(31).wrapping_add(17);
    }
    let err = load_image_from_bytes(&garbled, "record 12 of train.jsonl", &limits).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("record 12 of train.jsonl"));

    // A directory is not readable as a file.
    let err = load_image(dir.path(), &limits).unwrap_err();
    assert!(matches!(err, ImageError::Unreadable { .. }), "{err:?}");
}
