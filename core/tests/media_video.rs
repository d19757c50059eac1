//! Video probing, sampling and decoding on small videos written here with FFmpeg's MPEG-4
//! Part 2 encoder. Frame `i` is painted a flat colour that encodes `i`, so the decoded frames
//! tell which indices were sampled.

use std::path::{Path, PathBuf};
use std::process::Command;

use lmms_ft_core::data::video::{
    load_video, probe, sample_indices, FrameCountSource, FrameSelection, IndexRule, VideoError,
    VideoSampling,
};
use lmms_ft_core::data::RgbImage;
use lmms_ft_core::testing::write_test_video;
use serde_json::Value;

const W: u32 = 64;
const H: u32 = 48;
const FRAMES: usize = 30;
const FPS: i32 = 10;

fn colour(i: usize) -> [u8; 3] {
    [20 + 40 * (i % 6) as u8, 20 + 40 * (i / 6) as u8, 128]
}

/// Reads the frame index back from a decoded frame's centre, insisting the colour is close to
/// the painted one so a mis-decode cannot pass as a neighbouring index.
fn index_of(frame: &RgbImage) -> usize {
    let p = frame.get_pixel(W / 2, H / 2).0;
    let lo = ((f64::from(p[0]) - 20.0) / 40.0).round() as usize;
    let hi = ((f64::from(p[1]) - 20.0) / 40.0).round() as usize;
    let i = hi * 6 + lo;
    let want = colour(i);
    let off = p
        .iter()
        .zip(want)
        .map(|(a, b)| a.abs_diff(b))
        .max()
        .unwrap();
    assert!(
        off <= 12,
        "frame colour {p:?} is not close to index {i}'s {want:?}"
    );
    i
}

/// Encodes `FRAMES` frames at `FPS` with MPEG-4 Part 2 (B-frames on, so the decoder must
/// reorder) into the container the extension names. Without `durations` the packets carry no
/// duration, as from careless muxers: MP4 then ends its edit list at the last frame's start,
/// so the header counts 30 frames but the demuxer delivers 29.
fn write_video_with(path: &Path, durations: bool) {
    write_test_video(path, FRAMES, (W, H), FPS, durations, &colour);
}

fn video(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    write_video_with(&path, true);
    path
}

fn uniform(n: usize, rule: IndexRule) -> VideoSampling {
    VideoSampling {
        selection: FrameSelection::Uniform { num_frames: n },
        rule,
    }
}

fn fps(fps: f64, min_frames: usize, max_frames: usize) -> VideoSampling {
    VideoSampling {
        selection: FrameSelection::Fps {
            fps,
            min_frames,
            max_frames,
        },
        rule: IndexRule::Linspace,
    }
}

fn decoded_indices(path: &Path, sampling: &VideoSampling) -> (Vec<usize>, f64) {
    let clip = load_video(path, sampling).unwrap_or_else(|e| panic!("{e}"));
    for f in &clip.frames {
        assert_eq!(f.dimensions(), (W, H));
    }
    (clip.frames.iter().map(index_of).collect(), clip.sampled_fps)
}

#[test]
fn probe_reads_counts_and_falls_back_for_matroska() {
    let dir = tempfile::tempdir().unwrap();
    for (name, source) in [
        ("a.mp4", FrameCountSource::Container),
        ("a.avi", FrameCountSource::Container),
        // Matroska records no per-stream frame count: the packets are counted instead.
        ("a.mkv", FrameCountSource::CountedPackets),
    ] {
        let info = probe(&video(dir.path(), name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.frames, FRAMES as u64, "{name}");
        assert_eq!(info.frame_count_source, source, "{name}");
        assert!(
            (info.fps - f64::from(FPS)).abs() < 1e-6,
            "{name}: fps {}",
            info.fps
        );
        assert!(
            (info.duration - 3.0).abs() < 0.15,
            "{name}: duration {}",
            info.duration
        );
        assert_eq!((info.width, info.height), (W, H), "{name}");
    }
}

#[test]
fn uniform_sampling_decodes_the_expected_frames() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["u.mp4", "u.mkv"] {
        let path = video(dir.path(), name);
        // round(linspace(0, 29, 8)) = round(0, 4.14, 8.29, 12.43, 16.57, 20.71, 24.86, 29)
        let (got, sampled_fps) = decoded_indices(&path, &uniform(8, IndexRule::Linspace));
        assert_eq!(got, [0, 4, 8, 12, 17, 21, 25, 29], "{name}");
        assert!((sampled_fps - 8.0 / 30.0 * 10.0).abs() < 1e-9);
        // i * 30 // 8
        let (got, _) = decoded_indices(&path, &uniform(8, IndexRule::Floor));
        assert_eq!(got, [0, 3, 7, 11, 15, 18, 22, 26], "{name}");
        // Every frame, in order: the decoder's B-frame reordering is undone.
        let (got, _) = decoded_indices(&path, &uniform(30, IndexRule::Linspace));
        assert_eq!(got, (0..30).collect::<Vec<_>>(), "{name}");
        // More frames than the video has: capped at all of them.
        let (got, _) = decoded_indices(&path, &uniform(50, IndexRule::Linspace));
        assert_eq!(got.len(), 30, "{name}");
    }
}

#[test]
fn fps_sampling_counts_frames_from_the_duration() {
    let dir = tempfile::tempdir().unwrap();
    let path = video(dir.path(), "f.mp4");
    // 3 s at 2 fps = 6 frames: round(linspace(0, 29, 6)) = round(0, 5.8, 11.6, 17.4, 23.2, 29).
    let (got, sampled_fps) = decoded_indices(&path, &fps(2.0, 4, 768));
    assert_eq!(got, [0, 6, 12, 17, 23, 29]);
    assert!((sampled_fps - 2.0).abs() < 1e-9);
    // min_frames wins over 3 s at 1 fps.
    let (got, _) = decoded_indices(&path, &fps(1.0, 4, 768));
    assert_eq!(got, [0, 10, 19, 29]); // round(0, 9.67, 19.33, 29)
                                      // max_frames caps; 14.5 rounds half to even, as torch does.
    let (got, _) = decoded_indices(&path, &fps(2.0, 1, 3));
    assert_eq!(got, [0, 14, 29]);
    // 3 s at 0.5 fps = 1.5 frames, rounded half to even = 2.
    let (got, _) = decoded_indices(&path, &fps(0.5, 1, 768));
    assert_eq!(got, [0, 29]);
}

#[test]
fn a_header_over_reporting_by_a_frame_is_padded_with_the_last_frame() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no_durations.mp4");
    write_video_with(&path, false);
    let info = probe(&path).unwrap();
    assert_eq!(
        (info.frames, info.frame_count_source),
        (30, FrameCountSource::Container)
    );
    // Index 29 does not decode; its slot repeats frame 28, the last one there is.
    let (got, _) = decoded_indices(&path, &uniform(8, IndexRule::Linspace));
    assert_eq!(got, [0, 4, 8, 12, 17, 21, 25, 28]);
}

#[test]
fn frame_indices_match_torch_and_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/oracle/images.py");
    let python = std::env::var_os("LMMS_FT_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            let p = PathBuf::from(std::env::var_os("HOME")?).join(".cache/lmms-ft/venv/bin/python");
            p.exists().then_some(p)
        })
        .expect("no Python oracle: set LMMS_FT_PYTHON or run scripts/setup.sh");
    let out = Command::new(python)
        .arg(script)
        .arg("indices")
        .arg(dir.path())
        .output()
        .expect("cannot run the Python oracle (run scripts/setup.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("manifest.json")).unwrap())
            .unwrap();
    let cases = manifest["cases"].as_array().unwrap();
    assert!(cases.len() > 100);
    for case in cases {
        let total = case["total"].as_u64().unwrap();
        let n = case["n"].as_u64().unwrap() as usize;
        for (rule, key) in [
            (IndexRule::Linspace, "linspace"),
            (IndexRule::Floor, "floor"),
        ] {
            let want: Vec<u64> = case[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            let got = sample_indices(total, 25.0, &uniform(n, rule)).unwrap();
            assert_eq!(got, want, "{key}: total {total}, n {n}");
        }
    }
}

#[test]
fn bad_inputs_give_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sampling = uniform(4, IndexRule::Linspace);

    let err = load_video(&dir.path().join("gone.mp4"), &sampling).unwrap_err();
    assert!(matches!(err, VideoError::Missing { .. }), "{err:?}");
    assert!(err.to_string().contains("gone.mp4"));

    let junk = dir.path().join("junk.mp4");
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&junk, bytes).unwrap();
    let err = probe(&junk).unwrap_err();
    assert!(matches!(err, VideoError::NotAVideo { .. }), "{err:?}");
    assert!(err.to_string().contains("junk.mp4"));

    // A valid media file without a video stream: one second of silent 8 kHz PCM as WAV.
    let wav = dir.path().join("sound.wav");
    let samples = vec![0u8; 16_000];
    let mut riff = Vec::new();
    riff.extend_from_slice(b"RIFF");
    riff.extend_from_slice(&(36 + samples.len() as u32).to_le_bytes());
    riff.extend_from_slice(b"WAVEfmt ");
    riff.extend_from_slice(&16u32.to_le_bytes());
    riff.extend_from_slice(&1u16.to_le_bytes()); // PCM
    riff.extend_from_slice(&1u16.to_le_bytes()); // mono
    riff.extend_from_slice(&8000u32.to_le_bytes());
    riff.extend_from_slice(&16_000u32.to_le_bytes());
    riff.extend_from_slice(&2u16.to_le_bytes());
    riff.extend_from_slice(&16u16.to_le_bytes());
    riff.extend_from_slice(b"data");
    riff.extend_from_slice(&(samples.len() as u32).to_le_bytes());
    riff.extend_from_slice(&samples);
    std::fs::write(&wav, riff).unwrap();
    let err = load_video(&wav, &sampling).unwrap_err();
    assert!(matches!(err, VideoError::NoVideoStream { .. }), "{err:?}");
    assert!(err.to_string().contains("sound.wav"));

    let path = video(dir.path(), "ok.mp4");
    let err = load_video(&path, &uniform(0, IndexRule::Linspace)).unwrap_err();
    assert!(matches!(err, VideoError::Sampling { .. }), "{err:?}");
    let err = load_video(&path, &fps(2.0, 10, 5)).unwrap_err();
    assert!(matches!(err, VideoError::Sampling { .. }), "{err:?}");
    assert!(err.to_string().contains("ok.mp4"));

    // A truncated file: the header promises 30 frames, the data stops early.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.avi");
    let avi = video(dir.path(), "whole.avi");
    let avi_bytes = std::fs::read(&avi).unwrap();
    std::fs::write(&cut, &avi_bytes[..avi_bytes.len() / 2]).unwrap();
    assert!(bytes.len() > 1000);
    match load_video(&cut, &uniform(30, IndexRule::Linspace)) {
        Err(VideoError::Decode { path, reason }) => {
            assert!(path.contains("cut.avi"));
            assert!(reason.contains("frames decoded"), "{reason}");
        }
        other => panic!("expected a decode error for a truncated file, got {other:?}"),
    }
}
