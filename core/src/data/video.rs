//! Video probing, frame sampling and decoding to RGB8 through FFmpeg (ffmpeg-next).
//!
//! Frame sampling follows the references the families were trained with:
//!
//! * [`IndexRule::Linspace`] (default): `torch.linspace(0, total - 1, n).round()`, the rule of
//!   `qwen-vl-utils` (`fetch_video`), which Qwen2-VL / Qwen2.5-VL training code uses. Computed in
//!   float32 with torch's symmetric linspace and round-half-to-even, so the indices agree with
//!   torch bit for bit.
//! * [`IndexRule::Floor`]: `i * total // n`, transformers' `default_sample_indices_fn`
//!   (`video_utils.py`, used by its generic video processors).
//!
//! (transformers' own Qwen2-VL video processor instead uses `arange(0, total, total / n)`
//! truncated, after rounding `n` to the temporal patch size; the adapter may pick its rule.)
//!
//! With [`FrameSelection::Fps`], `n = clamp(round(total / video_fps * fps), min, max)` (the
//! duration is taken as `total / video_fps`, as qwen-vl-utils does, and `round` is Python's
//! half-to-even), capped at the number of frames, then sampled uniformly as above.

use std::path::Path;
use std::sync::Once;

use ffmpeg::format::Pixel;
use ffmpeg::media::Type;
use ffmpeg::software::scaling::{context::Context as Scaler, flag::Flags};
use ffmpeg_next as ffmpeg;
use image::RgbImage;

use super::VideoClip;

/// How many frames the container may over-report before a short decode is an error: headers
/// of real files are often off by a frame or two (edit lists, a dropped last frame).
const FRAME_COUNT_SLACK: u64 = 2;

/// Where [`VideoInfo::frames`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameCountSource {
    /// The container records the stream's frame count (`nb_frames`; MP4, AVI).
    Container,
    /// The container records none (Matroska/WebM, some streams): the video packets were
    /// counted by demuxing, without decoding. Exact for codecs that put one frame in each
    /// packet (all common ones), unlike `duration × rate`, which drifts with rounded
    /// durations and variable frame rates.
    CountedPackets,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VideoInfo {
    pub frames: u64,
    /// Average frame rate of the stream (falls back to the base rate, then frames/duration).
    pub fps: f64,
    /// Seconds, from the stream (else container) metadata, else `frames / fps`.
    pub duration: f64,
    pub width: u32,
    pub height: u32,
    pub frame_count_source: FrameCountSource,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FrameSelection {
    /// Exactly this many frames (fewer if the video is shorter).
    Uniform { num_frames: usize },
    /// `fps` frames per second of video, at least `min_frames` and at most `max_frames`.
    Fps {
        fps: f64,
        min_frames: usize,
        max_frames: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexRule {
    /// `round(linspace(0, total - 1, n))`, qwen-vl-utils.
    Linspace,
    /// `i * total // n`, transformers' `default_sample_indices_fn`.
    Floor,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoSampling {
    pub selection: FrameSelection,
    pub rule: IndexRule,
}

impl Default for VideoSampling {
    /// qwen-vl-utils' defaults: 2 frames per second, between 4 and 768 frames.
    fn default() -> Self {
        VideoSampling {
            selection: FrameSelection::Fps {
                fps: 2.0,
                min_frames: 4,
                max_frames: 768,
            },
            rule: IndexRule::Linspace,
        }
    }
}

/// Why a video could not be read; each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("video {path}: file not found")]
    Missing { path: String },
    #[error("video {path}: cannot read file: {source}")]
    Unreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("video {path}: not a video file FFmpeg can open ({reason})")]
    NotAVideo { path: String, reason: String },
    #[error("video {path}: the file has no video stream")]
    NoVideoStream { path: String },
    #[error("video {path}: the video stream has no frames")]
    NoFrames { path: String },
    #[error("video {path}: decoding failed: {reason}")]
    Decode { path: String, reason: String },
    #[error("video {path}: invalid frame sampling: {reason}")]
    Sampling { path: String, reason: String },
}

fn init_ffmpeg() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // `init` only registers components; it cannot fail on FFmpeg >= 4.
        let _ = ffmpeg::init();
        // Malformed dataset files are reported through our errors, not FFmpeg's stderr chatter.
        ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Fatal);
    });
}

fn open(path: &Path) -> Result<ffmpeg::format::context::Input, VideoError> {
    init_ffmpeg();
    let label = path.display().to_string();
    match std::fs::metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VideoError::Missing { path: label })
        }
        Err(source) => {
            return Err(VideoError::Unreadable {
                path: label,
                source,
            })
        }
    }
    ffmpeg::format::input(path).map_err(|e| VideoError::NotAVideo {
        path: label,
        reason: e.to_string(),
    })
}

fn rational(r: ffmpeg::Rational) -> Option<f64> {
    (r.numerator() > 0 && r.denominator() > 0)
        .then(|| f64::from(r.numerator()) / f64::from(r.denominator()))
}

/// Reads the frame count, rate and duration of the best video stream.
pub fn probe(path: &Path) -> Result<VideoInfo, VideoError> {
    let label = path.display().to_string();
    let mut ictx = open(path)?;
    let stream = ictx
        .streams()
        .best(Type::Video)
        .ok_or_else(|| VideoError::NoVideoStream {
            path: label.clone(),
        })?;
    let index = stream.index();
    let (width, height) = ffmpeg::codec::context::Context::from_parameters(stream.parameters())
        .and_then(|c| c.decoder().video())
        .map(|d| (d.width(), d.height()))
        .map_err(|e| VideoError::Decode {
            path: label.clone(),
            reason: format!("no decoder for the video stream: {e}"),
        })?;
    let recorded = stream.frames();
    let rate = rational(stream.avg_frame_rate()).or_else(|| rational(stream.rate()));
    let stream_duration = (stream.duration() > 0)
        .then(|| rational(stream.time_base()).map(|tb| stream.duration() as f64 * tb))
        .flatten();
    let container_duration = (ictx.duration() > 0)
        .then(|| ictx.duration() as f64 / f64::from(ffmpeg::ffi::AV_TIME_BASE));
    let (frames, source) = if recorded > 0 {
        (recorded as u64, FrameCountSource::Container)
    } else {
        (
            count_packets(&mut ictx, index, &label)?,
            FrameCountSource::CountedPackets,
        )
    };
    if frames == 0 {
        return Err(VideoError::NoFrames { path: label });
    }
    let duration = stream_duration.or(container_duration);
    let fps = match (rate, duration) {
        (Some(r), _) => r,
        (None, Some(d)) if d > 0.0 => frames as f64 / d,
        _ => {
            return Err(VideoError::Decode {
                path: label,
                reason: "the stream records neither a frame rate nor a duration".into(),
            })
        }
    };
    Ok(VideoInfo {
        frames,
        fps,
        duration: duration.unwrap_or(frames as f64 / fps),
        width,
        height,
        frame_count_source: source,
    })
}

fn count_packets(
    ictx: &mut ffmpeg::format::context::Input,
    index: usize,
    label: &str,
) -> Result<u64, VideoError> {
    let mut packet = ffmpeg::Packet::empty();
    let mut count = 0u64;
    loop {
        match packet.read(ictx) {
            Ok(()) => count += u64::from(packet.stream() == index),
            Err(ffmpeg::Error::Eof) => return Ok(count),
            // A corrupt packet is skipped by the demuxer, as when decoding.
            Err(ffmpeg::Error::InvalidData) => {}
            Err(e) => {
                return Err(VideoError::Decode {
                    path: label.to_string(),
                    reason: format!("demuxing failed after {count} packets: {e}"),
                })
            }
        }
    }
}

/// `round(x)` as Python and torch do it: halves go to the even neighbour.
fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// The frame indices (ascending) that `sampling` picks from a video of `total` frames at
/// `video_fps`; see the module docs for the rules.
pub fn sample_indices(
    total: u64,
    video_fps: f64,
    sampling: &VideoSampling,
) -> Result<Vec<u64>, String> {
    if total == 0 {
        return Err("the video has no frames".into());
    }
    let n = match sampling.selection {
        FrameSelection::Uniform { num_frames } => {
            if num_frames == 0 {
                return Err("num_frames must be at least 1".into());
            }
            num_frames as u64
        }
        FrameSelection::Fps {
            fps,
            min_frames,
            max_frames,
        } => {
            if !(fps > 0.0 && fps.is_finite() && video_fps > 0.0 && video_fps.is_finite()) {
                return Err(format!(
                    "fps sampling needs positive rates (asked {fps}, video has {video_fps})"
                ));
            }
            if min_frames > max_frames || max_frames == 0 {
                return Err(format!(
                    "min_frames ({min_frames}) must be <= max_frames ({max_frames}) and max_frames >= 1"
                ));
            }
            let wanted = round_half_even(total as f64 / video_fps * fps);
            wanted.clamp(min_frames as f64, max_frames as f64) as u64
        }
    }
    .clamp(1, total);
    Ok(match sampling.rule {
        IndexRule::Floor => (0..n).map(|i| i * total / n).collect(),
        IndexRule::Linspace => torch_linspace_f32(0.0, (total - 1) as f32, n)
            .into_iter()
            .map(|v| f64::from(v).round_ties_even().max(0.0) as u64)
            .map(|i| i.min(total - 1))
            .collect(),
    })
}

/// `torch.linspace(start, end, steps)` in float32: the first half steps up from `start`, the
/// second half down from `end`, which is what makes the last value exactly `end`.
fn torch_linspace_f32(start: f32, end: f32, steps: u64) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// Decodes the frames `sampling` selects, as RGB8 at the video's own size.
pub fn load_video(path: &Path, sampling: &VideoSampling) -> Result<VideoClip, VideoError> {
    let label = path.display().to_string();
    let info = probe(path)?;
    let indices =
        sample_indices(info.frames, info.fps, sampling).map_err(|reason| VideoError::Sampling {
            path: label.clone(),
            reason,
        })?;
    let frames = decode_frames(path, &indices, info.frames)?;
    Ok(VideoClip {
        sampled_fps: indices.len() as f64 / info.frames as f64 * info.fps,
        frames,
    })
}

/// Decodes sequentially (no seeking, so the index of a frame is its position in presentation
/// order) and keeps the frames at `indices`, which must be ascending.
fn decode_frames(path: &Path, indices: &[u64], expected: u64) -> Result<Vec<RgbImage>, VideoError> {
    let label = path.display().to_string();
    let fail = |reason: String| VideoError::Decode {
        path: label.clone(),
        reason,
    };
    let mut ictx = open(path)?;
    let stream = ictx
        .streams()
        .best(Type::Video)
        .ok_or_else(|| VideoError::NoVideoStream {
            path: label.clone(),
        })?;
    let stream_index = stream.index();
    let mut decoder = ffmpeg::codec::context::Context::from_parameters(stream.parameters())
        .and_then(|c| c.decoder().video())
        .map_err(|e| fail(format!("cannot open the decoder: {e}")))?;

    let mut state = Collector {
        wanted: indices,
        next: 0,
        decoded: 0,
        out: Vec::with_capacity(indices.len()),
        scaler: None,
        last: None,
    };
    let mut packet = ffmpeg::Packet::empty();
    while !state.done() {
        match packet.read(&mut ictx) {
            Ok(()) if packet.stream() == stream_index => {
                match decoder.send_packet(&packet) {
                    Ok(()) => {}
                    // A damaged packet costs its frame, as in FFmpeg's own tools; a shortfall
                    // is caught below.
                    Err(ffmpeg::Error::InvalidData) => continue,
                    Err(e) => return Err(fail(format!("sending a packet: {e}"))),
                }
                state.drain(&mut decoder).map_err(&fail)?;
            }
            Ok(()) | Err(ffmpeg::Error::InvalidData) => {}
            Err(ffmpeg::Error::Eof) => {
                // Flushing: a decoder may hold several reordered frames.
                decoder
                    .send_eof()
                    .map_err(|e| fail(format!("flushing: {e}")))?;
                state.drain(&mut decoder).map_err(&fail)?;
                break;
            }
            Err(e) => return Err(fail(format!("demuxing: {e}"))),
        }
    }
    if !state.done() {
        let short = expected.saturating_sub(state.decoded);
        match state.last.take() {
            Some(last) if short <= FRAME_COUNT_SLACK => {
                tracing::warn!(
                    path = %label,
                    decoded = state.decoded,
                    expected,
                    "video ended early; repeating its last frame for the missing samples"
                );
                while state.out.len() < indices.len() {
                    state.out.push(last.clone());
                }
            }
            _ => {
                return Err(fail(format!(
                    "only {} frames decoded, but the container reports {expected}",
                    state.decoded
                )))
            }
        }
    }
    Ok(state.out)
}

struct Collector<'a> {
    wanted: &'a [u64],
    next: usize,
    decoded: u64,
    out: Vec<RgbImage>,
    scaler: Option<(Scaler, Pixel, u32, u32)>,
    /// The most recent decoded frame, kept only to pad a short video.
    last: Option<RgbImage>,
}

impl Collector<'_> {
    fn done(&self) -> bool {
        self.next >= self.wanted.len()
    }

    fn drain(&mut self, decoder: &mut ffmpeg::decoder::Video) -> Result<(), String> {
        let mut frame = ffmpeg::frame::Video::empty();
        while decoder.receive_frame(&mut frame).is_ok() {
            let index = self.decoded;
            self.decoded += 1;
            let keep = self.wanted.get(self.next) == Some(&index);
            if !keep {
                // Only needed to pad the clip if the video turns out shorter than its header.
                let near_end = self
                    .wanted
                    .last()
                    .is_some_and(|&l| index < l && l - index <= FRAME_COUNT_SLACK);
                if near_end {
                    self.last = Some(self.convert(&frame)?);
                }
                continue;
            }
            let rgb = self.convert(&frame)?;
            while self.wanted.get(self.next) == Some(&index) {
                self.out.push(rgb.clone());
                self.next += 1;
            }
            self.last = Some(rgb);
        }
        Ok(())
    }

    fn convert(&mut self, frame: &ffmpeg::frame::Video) -> Result<RgbImage, String> {
        let (fmt, w, h) = (frame.format(), frame.width(), frame.height());
        let stale = !matches!(&self.scaler, Some((_, f, sw, sh)) if (*f, *sw, *sh) == (fmt, w, h));
        if stale {
            let scaler = Scaler::get(fmt, w, h, Pixel::RGB24, w, h, Flags::BILINEAR)
                .map_err(|e| format!("no conversion from {fmt:?} to RGB: {e}"))?;
            self.scaler = Some((scaler, fmt, w, h));
        }
        let Some((scaler, ..)) = self.scaler.as_mut() else {
            return Err("no pixel converter".into());
        };
        let mut rgb = ffmpeg::frame::Video::empty();
        scaler
            .run(frame, &mut rgb)
            .map_err(|e| format!("converting a frame to RGB: {e}"))?;
        let (w, h) = (w as usize, h as usize);
        let stride = rgb.stride(0);
        let data = rgb.data(0);
        let mut buf = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            let row = data
                .get(y * stride..y * stride + w * 3)
                .ok_or("the converted frame is smaller than its size")?;
            buf.extend_from_slice(row);
        }
        RgbImage::from_raw(w as u32, h as u32, buf).ok_or_else(|| "frame buffer size".to_string())
    }
}
