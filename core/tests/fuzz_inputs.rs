//! Property tests over everything lmms-ft reads from users: dataset files (JSON arrays,
//! JSONL, LLaVA `conversations` and OpenAI `messages` records), the TOML / `--set` config
//! layer, chat-template rendering of hostile text (placeholders and special tokens typed by
//! users, unbalanced template markers), safetensors headers, and truncated or altered images
//! and videos.
//!
//! Every input must give `Ok` or an error that names what it came from; a panic fails the
//! case (proptest catches it and shrinks the input), and the allocator below refuses any
//! single allocation over 2 GiB, so a reader sizing a buffer from a hostile header aborts
//! the binary instead of passing. The largest legitimate request is the image decoder's
//! limit (about 1.4 GB, Pillow's decompression-bomb size in 16-bit RGBA).
//!
//! Runs are deterministic (fixed seeds) and bounded: each target tries a fixed number of
//! cases, `PROPTEST_CASES` scales them, and each prints how many it tried.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use lmms_ft_core::config::Sources;
use lmms_ft_core::data::dataset::{Dataset, DatasetOptions};
use lmms_ft_core::data::media::{load_image_from_bytes, ImageLimits};
use lmms_ft_core::data::template::{ContentMode, HfChatTemplate, MediaPlaceholders};
use lmms_ft_core::data::video::{load_video, FrameSelection, IndexRule, VideoSampling};
use lmms_ft_core::data::{Conversation, Part, Role, Turn};
use lmms_ft_core::family::{ChatTemplate, MediaTokens, IGNORE_INDEX};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

const ALLOC_LIMIT: usize = 2 << 30;

struct Bounded;

// SAFETY: forwards to the system allocator, refusing (null) only oversized requests.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Bounded = Bounded;

/// Runs `test` on `cases` inputs drawn from `strategy` with a fixed seed, then reports on
/// stderr (outside the test harness's capture) how many it tried.
fn fuzz<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<bool, TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let scale: f64 = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(1.0, |n| n / 256.0);
    let cases = ((f64::from(cases) * scale).round() as u32).max(1);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut seed = [0u8; 32];
    for (i, b) in name.bytes().enumerate() {
        seed[i % 32] ^= b;
    }
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let (tried, accepted) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let started = std::time::Instant::now();
    let result = runner.run(&strategy, |v| {
        tried.fetch_add(1, Ordering::Relaxed);
        if test(v)? {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    });
    let _ = writeln!(
        std::io::stderr(),
        "fuzz {name}: {} cases ({} accepted, the rest refused with an error) in {:.1} s{}",
        tried.load(Ordering::Relaxed),
        accepted.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        if result.is_ok() { "" } else { ", FAILED" }
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

/// An edit of a byte string: truncation, deletion, insertion of a hostile fragment, or a
/// changed byte.
#[derive(Debug, Clone)]
enum Edit {
    Truncate(usize),
    Delete(usize, usize),
    Insert(usize, Vec<u8>),
    Set(usize, u8),
}

fn edit(fragments: &'static [&'static str]) -> impl Strategy<Value = Edit> {
    let fragment = prop_oneof![
        proptest::sample::select(fragments).prop_map(|s| s.as_bytes().to_vec()),
        proptest::collection::vec(any::<u8>(), 1..8),
    ];
    prop_oneof![
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), 1usize..16).prop_map(|(a, n)| Edit::Delete(a, n)),
        (any::<usize>(), fragment).prop_map(|(a, f)| Edit::Insert(a, f)),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Edit::Set(a, b)),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = bytes.len().max(1);
        match e {
            Edit::Truncate(at) => bytes.truncate(at % n),
            Edit::Delete(at, len) => {
                let at = at % n;
                let end = (at + len).min(bytes.len());
                if at < end {
                    bytes.drain(at..end);
                }
            }
            Edit::Insert(at, f) => {
                let at = (at % n).min(bytes.len());
                bytes.splice(at..at, f.iter().copied());
            }
            Edit::Set(at, b) => {
                if !bytes.is_empty() {
                    let at = at % bytes.len();
                    bytes[at] = *b;
                }
            }
        }
    }
    bytes
}

const JSON_FRAGMENTS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ",",
    ":",
    "null",
    "true",
    "1e999",
    "-0",
    "18446744073709551616",
    "\"\\ud800\"",
    "\\u0000",
    "\n",
    "\u{feff}",
    "\"conversations\"",
    "\"messages\"",
    "\"from\"",
    "\"value\"",
    "\"role\"",
    "\"content\"",
    "\"type\"",
    "\"image\"",
    "\"video\"",
    "\"images\"",
    "\"text\"",
    "<image>",
    "<video>",
    "\"human\"",
    "\"gpt\"",
    "\"system\"",
    "\"../../etc/passwd\"",
    "[[[[[[[[[[[[[[[[[[[[",
    "{\"a\":{\"a\":{\"a\":",
];

fn seed_records() -> Vec<serde_json::Value> {
    use serde_json::json;
    vec![
        json!({"id": "a", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cat."}]}),
        json!({"images": ["a.png", "b.png"], "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image><image> Compare."},
            {"from": "gpt", "value": "Same."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."}]}),
        json!({"video": "v.mp4", "conversations": [
            {"from": "human", "value": "<video>What happens?"},
            {"from": "gpt", "value": "Nothing."}]}),
        json!({"messages": [
            {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello"}]}),
        json!({"messages": [
            {"role": "system", "content": "x"},
            {"role": "user", "content": "plain"},
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]}),
    ]
}

/// A dataset file: some seed records as a JSON array or as JSONL, then edited.
fn dataset_file() -> impl Strategy<Value = (bool, Vec<usize>, Vec<Edit>)> {
    (
        any::<bool>(),
        proptest::collection::vec(0usize..5, 0..5),
        proptest::collection::vec(edit(JSON_FRAGMENTS), 0..6),
    )
}

#[test]
fn dataset_readers_never_panic_and_locate_their_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let seeds = seed_records();
    let counter = AtomicUsize::new(0);
    fuzz(
        "dataset readers (JSON, JSONL, conversations, messages)",
        2048,
        dataset_file(),
        |(array, picks, edits)| {
            let records: Vec<&serde_json::Value> = picks.iter().map(|&i| &seeds[i]).collect();
            let text = if array {
                serde_json::to_string_pretty(&records).unwrap()
            } else {
                records
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let bytes = apply(text.into_bytes(), &edits);
            let k = counter.fetch_add(1, Ordering::Relaxed);
            let path = tmp
                .path()
                .join(format!("d{k}.{}", if array { "json" } else { "jsonl" }));
            std::fs::write(&path, &bytes).unwrap();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            // Accepted: the file opens and yields at least one good record.
            let mut accepted = false;
            match Dataset::open(&path, DatasetOptions::default()) {
                Err(e) => prop_assert!(e.to_string().contains(&name), "{e}"),
                Ok(ds) => {
                    for item in ds
                        .records()
                        .map_err(|e| TestCaseError::fail(e.to_string()))?
                    {
                        match item {
                            Ok(_) => accepted = true,
                            Err(e) => prop_assert!(e.to_string().contains(&name), "unlocated: {e}"),
                        }
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
            Ok(accepted)
        },
    );
}

const KEYS: &[&str] = &[
    "train.learning_rate",
    "train.max_steps",
    "train.batch_size",
    "train.output_dir",
    "train.resume",
    "train.overwrite",
    "train.mode",
    "train.llm",
    "data.train",
    "data.max_length",
    "data.on_bad_sample",
    "lora.r",
    "lora.target_modules",
    "lora.modules_to_save",
    "model.id",
    "quant.bits",
    "train",
    "",
    "a.b.c.d.e.f.g",
    "train.",
    ".train",
    "train..x",
    "nope.key",
    "train.learning_rate.x",
];
const VALUES: &[&str] = &[
    "1",
    "-1",
    "0",
    "2e-5",
    "1e400",
    "nan",
    "inf",
    "-inf",
    "true",
    "\"x\"",
    "x y",
    "[1,2]",
    "[\"q_proj\"]",
    "{a = 1}",
    "18446744073709551616",
    "\"\\u0000\"",
    "'",
    "\"",
    "[",
    "]",
    "lora",
    "qlora",
    "full",
    "frozen",
    "skip",
    "1979-05-27",
    "\u{1F600}",
    "",
];

fn toml_text() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        proptest::sample::select(
            &[
                "[train]",
                "[data]",
                "[model]",
                "[lora]",
                "[quant]",
                "[[train]]",
                "[train.x]",
                "[",
                "]]",
                "= 1",
                "# c"
            ][..]
        )
        .prop_map(|s| s.to_string()),
        (
            proptest::sample::select(KEYS),
            proptest::sample::select(VALUES)
        )
            .prop_map(|(k, v)| {
                let key = k.rsplit('.').next().unwrap_or(k);
                format!("{key} = {v}")
            }),
    ];
    (
        proptest::collection::vec(line, 0..10),
        proptest::collection::vec(edit(&["=", "[", "]", "\"", "\n", "'''", "\\"]), 0..3),
    )
        .prop_map(|(lines, edits)| apply(lines.join("\n").into_bytes(), &edits))
}

fn set_arg() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            proptest::sample::select(KEYS),
            proptest::sample::select(VALUES)
        )
            .prop_map(|(k, v)| format!("{k}={v}")),
        proptest::sample::select(&["=", "noequals", "=1", " = ", "train.lora=="][..])
            .prop_map(String::from),
    ]
}

#[test]
fn config_layers_never_panic_and_name_the_key_or_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("run.toml");
    fuzz(
        "TOML file and --set layer",
        1024,
        (toml_text(), proptest::collection::vec(set_arg(), 0..4)),
        |(toml, sets)| {
            std::fs::write(&file, &toml).unwrap();
            let sources = Sources {
                file: Some(file.clone()),
                env: false,
                flags: Vec::new(),
                sets: sets.clone(),
            };
            let loaded = sources.load();
            let accepted = loaded.is_ok();
            match loaded {
                Err(e) => {
                    // Each problem names its key and layer; TOML syntax errors add their
                    // own lines (the offending line, a caret) after the first.
                    let msg = e.to_string();
                    prop_assert!(
                        msg.contains("run.toml")
                            || msg.contains("command line")
                            || msg.contains("--set"),
                        "an error without its source: {msg}"
                    );
                }
                Ok(cfg) => {
                    // A resolved config always renders, and reads back as itself.
                    let text = toml::to_string_pretty(&cfg)
                        .map_err(|e| TestCaseError::fail(format!("rendering: {e}")))?;
                    std::fs::write(&file, &text).unwrap();
                    let again = lmms_ft_core::config::from_file(&file)
                        .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
                    prop_assert_eq!(toml::to_string_pretty(&again).unwrap(), text);
                }
            }
            Ok(accepted)
        },
    );
}

const HOSTILE: &[&str] = &[
    "<image>",
    "<video>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|im_start|>assistant\n",
    "<|endoftext|>",
    "</s>",
    "<s>",
    "[INST]",
    "{{ messages }}",
    "{% if %}",
    "{#",
    "\u{0}",
    "\u{202e}",
    "\r\n",
    "USER:",
    "ASSISTANT:",
    "<|eot_id|>",
    " ",
    "é中",
    "\\n",
];

fn hostile_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            proptest::sample::select(HOSTILE).prop_map(String::from),
            "[a-z ]{0,6}",
        ],
        0..6,
    )
    .prop_map(|v| v.concat())
}

/// A user turn's text, the token count of its image (if it has one), the answer.
type Round = (String, Option<usize>, String);

/// A conversation of hostile texts with real image parts: an optional system prompt and
/// its rounds.
fn hostile_conversation() -> impl Strategy<Value = (Option<String>, Vec<Round>)> {
    (
        proptest::option::of(hostile_text()),
        proptest::collection::vec(
            (
                hostile_text(),
                proptest::option::of(1usize..4),
                hostile_text(),
            ),
            1..4,
        ),
    )
}

fn template_of(dir: &Path, media: MediaPlaceholders) -> HfChatTemplate {
    HfChatTemplate::from_dir(dir, media, ContentMode::Parts).expect("template")
}

#[test]
fn chat_templates_render_hostile_text_without_panics_or_stray_media_tokens() {
    // The tiny Qwen2-VL fixture carries the real Qwen2.5-VL tokenizer and template.
    let (qwen, _) = lmms_ft_core::testing::cached_fixture("qwen2_vl_fixture.py", "qwen2_vl");
    let llava = lmms_ft_core::testing::hf_configs().join("llava-hf--llava-1.5-7b-hf");
    let templates = [
        (
            "Qwen2.5-VL",
            template_of(
                &qwen,
                MediaPlaceholders::new("<|image_pad|>", Some("<|video_pad|>")),
            ),
        ),
        (
            "llava-1.5",
            template_of(&llava, MediaPlaceholders::new("<image>", None)),
        ),
    ];
    for (name, template) in &templates {
        fuzz(
            &format!("chat template {name} with hostile text"),
            256,
            hostile_conversation(),
            |(system, rounds)| {
                let mut turns = Vec::new();
                if let Some(s) = system {
                    turns.push(Turn::text(Role::System, s));
                }
                let mut media = MediaTokens::default();
                for (user, image, answer) in rounds {
                    let mut parts = vec![Part::Text { text: user }];
                    if let Some(k) = image {
                        parts.insert(
                            0,
                            Part::Image {
                                index: media.images.len(),
                            },
                        );
                        media.images.push(k);
                    }
                    turns.push(Turn {
                        role: Role::User,
                        parts,
                    });
                    turns.push(Turn::text(Role::Assistant, answer));
                }
                let conv = Conversation { turns };
                let _ = template.render(&conv, false);
                let encoded = template.encode(&conv, &media, false);
                let accepted = encoded.is_ok();
                match encoded {
                    // Typed placeholders make the counts disagree: refused, with the counts.
                    Err(e) => {
                        let msg = format!("{e:#}");
                        prop_assert!(msg.contains("placeholder"), "{msg}");
                    }
                    Ok(enc) => {
                        prop_assert_eq!(enc.input_ids.len(), enc.labels.len());
                        let media_tokens = enc
                            .input_ids
                            .iter()
                            .filter(|&&id| template.is_media_token(id))
                            .count();
                        prop_assert_eq!(media_tokens, media.images.iter().sum::<usize>());
                        for (&id, &label) in enc.input_ids.iter().zip(&enc.labels) {
                            prop_assert!(label == IGNORE_INDEX || label == id);
                            prop_assert!(label == IGNORE_INDEX || !template.is_media_token(id));
                        }
                    }
                }
                Ok(accepted)
            },
        );
    }
}

/// A safetensors file: an 8-byte header length (true or hostile), a JSON header of
/// tensors with any dtype, shape and offsets, and a few data bytes; or, half the time, a
/// consistent file (offsets and data matching the shapes) with at most one edit.
fn safetensors_file() -> impl Strategy<Value = Vec<u8>> {
    let dtype = proptest::sample::select(
        &[
            "F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X", "",
        ][..],
    );
    let dim = prop_oneof![
        0u64..5,
        Just(1_000_000u64),
        Just(u64::MAX),
        Just(1u64 << 62)
    ];
    let tensor = (
        "[a-z.]{0,6}",
        dtype,
        proptest::collection::vec(dim, 0..4),
        (0u64..64, 0u64..64),
    );
    let hostile = (
        proptest::collection::vec(tensor, 0..4),
        proptest::option::of(prop_oneof![
            Just(u64::MAX),
            Just(1_000_000_000_000u64),
            0u64..512
        ]),
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::collection::vec(edit(&["{", "}", "\"", ",", "[", "]"]), 0..2),
    )
        .prop_map(|(tensors, length, data, edits)| {
            let mut header = serde_json::Map::new();
            for (name, dtype, shape, (a, b)) in tensors {
                header.insert(
                    name,
                    serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [a, a + b]}),
                );
            }
            let header = apply(serde_json::to_vec(&header).unwrap(), &edits);
            let mut bytes = length.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
            bytes.extend(header);
            bytes.extend(data);
            bytes
        });
    let sizes = [
        ("F32", 4u64),
        ("F16", 2),
        ("BF16", 2),
        ("I64", 8),
        ("U8", 1),
    ];
    let consistent = (
        proptest::collection::vec(
            ("[a-z]{1,4}", 0..sizes.len(), proptest::collection::vec(1u64..4, 0..3)),
            1..4,
        ),
        proptest::collection::vec(edit(&["{", "}", "\"", "9"]), 0..2),
    )
        .prop_map(move |(tensors, edits)| {
            let mut header = serde_json::Map::new();
            let mut offset = 0u64;
            for (name, d, shape) in tensors {
                let (dtype, size) = sizes[d];
                let n = shape.iter().product::<u64>() * size;
                header.insert(
                    name,
                    serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}),
                );
                offset += n;
            }
            let header = serde_json::to_vec(&header).unwrap();
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend(header);
            bytes.extend(std::iter::repeat_n(7u8, offset as usize));
            apply(bytes, &edits)
        });
    prop_oneof![hostile, consistent]
}

#[test]
fn safetensors_headers_are_checked_before_anything_is_allocated() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("model.safetensors");
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _w = vs.root().zeros("w", &[2, 3]);
    // The case the issue names: 10^12 f32 elements declared in a 100-byte file.
    let header = serde_json::json!({"w": {"dtype": "F32", "shape": [1_000_000, 1_000_000], "data_offsets": [0, 4_000_000_000_000u64]}});
    let header = serde_json::to_vec(&header).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(&header);
    bytes.extend([0u8; 16]);
    std::fs::write(&file, &bytes).unwrap();
    let err = lmms_ft_core::peft::io::read_safetensors(&file).expect_err("refused");
    assert!(format!("{err:#}").contains("model.safetensors"), "{err:#}");
    let opts = lmms_ft_core::weights::LoadOptions::default();
    let err = lmms_ft_core::weights::load_into(&vs, &dir, &opts).expect_err("refused");
    assert!(format!("{err:#}").contains("model.safetensors"), "{err:#}");

    fuzz("safetensors headers", 1024, safetensors_file(), |bytes| {
        std::fs::write(&file, &bytes).unwrap();
        let read = lmms_ft_core::peft::io::read_safetensors(&file);
        let accepted = read.is_ok();
        if let Err(e) = read {
            prop_assert!(format!("{e:#}").contains("model.safetensors"), "{e:#}");
        }
        // Loading into a model also checks names and shapes, naming the directory.
        if let Err(e) = lmms_ft_core::weights::load_into(&vs, &dir, &opts) {
            prop_assert!(format!("{e:#}").contains("model"), "{e:#}");
        }
        Ok(accepted)
    });
}

fn encoded_images() -> Vec<(&'static str, Vec<u8>)> {
    let img = image::RgbImage::from_fn(24, 16, |x, y| {
        image::Rgb([(x * 10) as u8, (y * 15) as u8, 77])
    });
    let mut out = Vec::new();
    for (name, format) in [
        ("png", image::ImageFormat::Png),
        ("jpeg", image::ImageFormat::Jpeg),
        ("gif", image::ImageFormat::Gif),
        ("webp", image::ImageFormat::WebP),
        ("bmp", image::ImageFormat::Bmp),
        ("tiff", image::ImageFormat::Tiff),
    ] {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut bytes, format)
            .unwrap();
        out.push((name, bytes.into_inner()));
    }
    out
}

#[test]
fn truncated_or_altered_images_are_errors_naming_the_file() {
    let images = encoded_images();
    let limits = ImageLimits::default();
    for (name, bytes) in &images {
        assert!(
            load_image_from_bytes(bytes, "intact", &limits).is_ok(),
            "{name}"
        );
    }
    let strategy = (
        0..images.len(),
        proptest::collection::vec(edit(&["\0\0\0\0", "\u{ff}\u{ff}", "IHDR", "IDAT"]), 1..4),
    );
    fuzz(
        "image decoding (PNG, JPEG, GIF, WebP, BMP, TIFF)",
        2048,
        strategy,
        |(i, edits)| {
            let (name, bytes) = &images[i];
            let broken = apply(bytes.clone(), &edits);
            let origin = format!("fuzz.{name}");
            match load_image_from_bytes(&broken, &origin, &limits) {
                Ok(_) => Ok(true),
                Err(e) => {
                    prop_assert!(e.to_string().contains(&origin), "{e}");
                    Ok(false)
                }
            }
        },
    );
}

fn test_video(dir: &Path) -> PathBuf {
    let path = dir.join("clip.mp4");
    lmms_ft_core::testing::write_test_video(&path, 12, (32, 24), 6, true, &|i| {
        [(i * 20) as u8, 100, 200]
    });
    path
}

#[test]
fn truncated_or_altered_videos_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let intact = std::fs::read(test_video(tmp.path())).unwrap();
    let sampling = VideoSampling {
        selection: FrameSelection::Uniform { num_frames: 4 },
        rule: IndexRule::Linspace,
    };
    let path = tmp.path().join("broken.mp4");
    std::fs::write(&path, &intact).unwrap();
    assert_eq!(load_video(&path, &sampling).unwrap().frames.len(), 4);
    let strategy = proptest::collection::vec(edit(&["moov", "mdat", "\0\0\0\0", "\u{ff}"]), 1..3);
    fuzz("video decoding (MP4)", 256, strategy, |edits| {
        std::fs::write(&path, apply(intact.clone(), &edits)).unwrap();
        match load_video(&path, &sampling) {
            Ok(_) => Ok(true),
            Err(e) => {
                prop_assert!(e.to_string().contains("broken.mp4"), "{e}");
                Ok(false)
            }
        }
    });
}
