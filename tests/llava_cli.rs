//! `lmms-ft evaluate` end to end on tiny LLaVA checkpoints saved by transformers
//! (`scripts/oracle/llava_fixture.py`): LLaVA-1.5 (pad-to-square, Vicuna training template),
//! LLaVA-NeXT with Vicuna and with Mistral text (anyres, Hub template), LLaVA-Interleave
//! (SigLIP + Qwen2, ChatML), LLaVA-NeXT-Video (registered as its
//! own family; Vicuna training template with `<video>`) and LLaVA-OneVision (anyres_max, one
//! tile per image of the two-image sample). Per-sample losses under the label rule, their
//! label counts and the token-weighted mean equal the oracle's. For the video variants the
//! fixture's four frames are written losslessly (PNG codec, RGB24, Matroska) and read back
//! by the CLI's FFmpeg decoder with `data.video_num_frames = 4`.

use std::path::Path;
use std::process::Command;

use ffmpeg::format::Pixel;
use ffmpeg_next as ffmpeg;

use lmms_ft_core::testing::{assert_evaluate_report, cached_fixture};

mod support;
use support::llava_record;

fn check_evaluate(variant: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = cached_fixture("llava_fixture.py", variant);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let mut samples = vec![
        ("text", vec![]),
        ("image", vec!["image_b.png"]),
        ("two_images", vec!["image_a.png", "image_b.png"]),
    ];
    let mut records: Vec<serde_json::Value> = samples
        .iter()
        .map(|(name, images)| llava_record(&meta["samples"][name]["messages"], images))
        .collect();
    if meta["samples"].get("video").is_some() {
        write_lossless_video(&dir.join("video.rgb"), &tmp.path().join("clip.mkv"));
        // The video part comes first in the user turn, as `<image>` does for images.
        let mut record = llava_record(&meta["samples"]["video"]["messages"], &[]);
        let first = &mut record["conversations"][0]["value"];
        *first = format!("<video>{}", first.as_str().unwrap()).into();
        record["video"] = "clip.mkv".into();
        records.push(record);
        samples.push(("video", vec![]));
    }
    let data = tmp.path().join("data.json");
    std::fs::write(&data, serde_json::to_string_pretty(&records).unwrap()).unwrap();
    let out = tmp.path().join("eval.json");
    let run = Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args([
            "evaluate",
            "--model-path",
            dir.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--image-folder",
            dir.to_str().unwrap(),
            "--video-folder",
            tmp.path().to_str().unwrap(),
            "--set",
            "data.video_num_frames=4",
            "--json",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{variant}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let names: Vec<&str> = samples.iter().map(|(name, _)| *name).collect();
    assert_evaluate_report(&dir, &out, &names, variant);
}

/// The fixture's four 56 × 70 RGB8 frames as a 4-fps Matroska file with the PNG codec, so
/// decoding gives back exactly the frames transformers saw.
fn write_lossless_video(raw: &Path, path: &Path) {
    const W: u32 = 56;
    const H: u32 = 70;
    let bytes = std::fs::read(raw).unwrap();
    ffmpeg::init().unwrap();
    let mut octx = ffmpeg::format::output(path).unwrap();
    let codec = ffmpeg::encoder::find(ffmpeg::codec::Id::PNG).expect("no PNG encoder");
    let mut enc = ffmpeg::codec::context::Context::new_with_codec(codec)
        .encoder()
        .video()
        .unwrap();
    let tb = ffmpeg::Rational(1, 4);
    enc.set_width(W);
    enc.set_height(H);
    enc.set_format(Pixel::RGB24);
    enc.set_time_base(tb);
    enc.set_frame_rate(Some(ffmpeg::Rational(4, 1)));
    if octx
        .format()
        .flags()
        .contains(ffmpeg::format::Flags::GLOBAL_HEADER)
    {
        enc.set_flags(ffmpeg::codec::Flags::GLOBAL_HEADER);
    }
    let mut enc = enc.open_as(codec).unwrap();
    {
        let mut ost = octx.add_stream(codec).unwrap();
        ost.set_parameters(&enc);
        ost.set_time_base(tb);
    }
    octx.write_header().unwrap();
    let ost_tb = octx.stream(0).unwrap().time_base();
    let write_packets = |enc: &mut ffmpeg::encoder::Video,
                         octx: &mut ffmpeg::format::context::Output| {
        let mut packet = ffmpeg::Packet::empty();
        while enc.receive_packet(&mut packet).is_ok() {
            packet.set_stream(0);
            packet.set_duration(1);
            packet.rescale_ts(tb, ost_tb);
            packet.write_interleaved(octx).unwrap();
        }
    };
    let row = (W * 3) as usize;
    for (i, frame) in bytes.chunks(row * H as usize).enumerate() {
        let mut rgb = ffmpeg::frame::Video::new(Pixel::RGB24, W, H);
        let stride = rgb.stride(0);
        let data = rgb.data_mut(0);
        for y in 0..H as usize {
            data[y * stride..y * stride + row].copy_from_slice(&frame[y * row..(y + 1) * row]);
        }
        rgb.set_pts(Some(i as i64));
        enc.send_frame(&rgb).unwrap();
        write_packets(&mut enc, &mut octx);
    }
    enc.send_eof().unwrap();
    write_packets(&mut enc, &mut octx);
    octx.write_trailer().unwrap();
}

#[test]
fn evaluate_llava_1_5_matches_transformers() {
    check_evaluate("llava");
}

#[test]
fn evaluate_llava_next_mistral_matches_transformers() {
    check_evaluate("next_mistral");
}

#[test]
fn evaluate_llava_next_video_matches_transformers() {
    check_evaluate("next_video");
}

#[test]
fn evaluate_llava_onevision_matches_transformers() {
    check_evaluate("onevision");
}

#[test]
fn evaluate_llava_interleave_matches_transformers() {
    check_evaluate("interleave");
}

#[test]
fn evaluate_llava_next_vicuna_matches_transformers() {
    check_evaluate("next_vicuna");
}
