//! Pre-flight checks of a dataset: the engine behind `lmms-ft validate-data`, and the same
//! checks applied lazily per record during training ([`check_record`], [`screen_record`]).
//!
//! Validation reads every record and collects every problem, so a user fixes a dataset in
//! one pass instead of one error per run. Model-specific parts come in as closures (video
//! decoding, token length after media expansion) so this module depends on no family.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::dataset::{
    Dataset, DatasetError, DatasetOptions, Record, RecordError, RecordErrorKind, SourceLocation,
};
use super::{Part, Role};
use crate::config::OnBadSample;

/// Checks a video file (decodable, has frames...); supplied by the video module.
pub type VideoCheck<'a> = &'a (dyn Fn(&Path) -> anyhow::Result<()> + Send + Sync);
/// Token length of a record after media expansion; supplied by the model's template.
pub type TokenLength<'a> = &'a (dyn Fn(&Record) -> anyhow::Result<usize> + Send + Sync);

/// How media files are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaCheck {
    /// Do not look at media files.
    Skip,
    /// Only check that each file exists (cheap, for training where media is decoded anyway).
    Exists,
    /// Decode every image fully (catches truncated and mislabelled files) and run the video
    /// check on every video.
    Decode,
}

/// What to check besides the record structure, which is always checked.
#[derive(Clone, Copy)]
pub struct Checks<'a> {
    pub media: MediaCheck,
    pub video_check: Option<VideoCheck<'a>>,
    pub token_length: Option<TokenLength<'a>>,
    /// Records longer than this (per `token_length`) are reported as too long.
    pub max_length: Option<usize>,
}

impl Default for Checks<'_> {
    fn default() -> Self {
        Checks {
            media: MediaCheck::Decode,
            video_check: None,
            token_length: None,
            max_length: None,
        }
    }
}

/// The kind of a [`Problem`], for filtering and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemKind {
    /// Not valid JSON (or UTF-8).
    Json,
    /// Valid JSON that is not a record (missing `conversations`, unknown role...).
    Schema,
    /// The dataset file could not be read.
    Io,
    MissingMedia,
    BadImage,
    BadVideo,
    /// Number of image / video placeholders differs from the number of media paths.
    PlaceholderMismatch,
    RoleOrder,
    EmptyTurn,
    /// Longer than `max_length` after media expansion.
    TooLong,
    /// The token-length closure failed.
    Length,
}

impl ProblemKind {
    pub fn label(self) -> &'static str {
        match self {
            ProblemKind::Json => "invalid JSON",
            ProblemKind::Schema => "bad record",
            ProblemKind::Io => "read error",
            ProblemKind::MissingMedia => "missing media",
            ProblemKind::BadImage => "bad image",
            ProblemKind::BadVideo => "bad video",
            ProblemKind::PlaceholderMismatch => "placeholder mismatch",
            ProblemKind::RoleOrder => "role order",
            ProblemKind::EmptyTurn => "empty turn",
            ProblemKind::TooLong => "too long",
            ProblemKind::Length => "length error",
        }
    }
}

/// One thing wrong with the dataset, located precisely enough to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {}: {message}", .kind.label())]
pub struct Problem {
    pub location: SourceLocation,
    pub kind: ProblemKind,
    pub message: String,
}

impl From<RecordError> for Problem {
    fn from(e: RecordError) -> Self {
        Problem {
            location: e.location,
            kind: match e.kind {
                RecordErrorKind::Json => ProblemKind::Json,
                RecordErrorKind::Schema => ProblemKind::Schema,
                RecordErrorKind::Io => ProblemKind::Io,
            },
            message: e.message,
        }
    }
}

/// All problems of one record, and its token length when it could be computed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordCheck {
    pub problems: Vec<Problem>,
    pub length: Option<usize>,
}

/// Checks one record and returns its first problem, for training with `on_bad_sample`.
/// On success returns the token length when a length closure was given, so the caller need
/// not compute it twice.
pub fn check_record(record: &Record, checks: &Checks) -> Result<Option<usize>, Problem> {
    let mut result = Checker::new(checks).record(record);
    match result.problems.is_empty() {
        true => Ok(result.length),
        false => Err(result.problems.swap_remove(0)),
    }
}

/// Every problem of one record, in a fixed order: structure, media, length.
pub fn record_problems(record: &Record, checks: &Checks) -> RecordCheck {
    Checker::new(checks).record(record)
}

/// Applies `on_bad_sample` to one record: `Ok(Some)` to train on it, `Ok(None)` when it is
/// skipped (the reason is logged), `Err` when training must stop.
pub fn screen_record(
    record: Record,
    checks: &Checks,
    policy: OnBadSample,
) -> Result<Option<Record>, Problem> {
    match check_record(&record, checks) {
        Ok(_) => Ok(Some(record)),
        Err(problem) => match policy {
            OnBadSample::Error => Err(problem),
            OnBadSample::Skip => {
                tracing::warn!("skipping sample: {problem}");
                Ok(None)
            }
        },
    }
}

/// Token-length percentiles over the samples whose length could be computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LengthStats {
    pub count: usize,
    pub p50: usize,
    pub p90: usize,
    pub p99: usize,
    pub max: usize,
}

impl LengthStats {
    /// Nearest-rank percentiles: the p-th percentile is the smallest length such that at
    /// least p % of the lengths are ≤ it (`sorted[ceil(p/100 · n) − 1]`), so every reported
    /// value is a real sample length.
    pub fn from_lengths(lengths: &[usize]) -> Option<Self> {
        let mut sorted = lengths.to_vec();
        sorted.sort_unstable();
        let n = sorted.len();
        let max = *sorted.last()?;
        let rank = |p: usize| sorted[((p * n).div_ceil(100)).clamp(1, n) - 1];
        Some(LengthStats {
            count: n,
            p50: rank(50),
            p90: rank(90),
            p99: rank(99),
            max,
        })
    }
}

/// What `validate-data` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationReport {
    /// Records read successfully (with or without problems of their own).
    pub samples: usize,
    /// Entries that could not be read as records (bad JSON, bad schema).
    pub unreadable: usize,
    pub text_only: usize,
    pub with_images: usize,
    pub with_videos: usize,
    /// Over samples without other problems, when a length closure was given.
    pub lengths: Option<LengthStats>,
    pub max_length: Option<usize>,
    /// Samples over `max_length`, i.e. dropped under `overlength = "drop"`.
    pub over_length: usize,
    /// In file order; within a record: structure, media, length.
    pub problems: Vec<Problem>,
}

impl ValidationReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for ValidationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "samples: {} ({} text-only, {} with images, {} with videos)",
            self.samples, self.text_only, self.with_images, self.with_videos
        )?;
        if self.unreadable > 0 {
            writeln!(f, "unreadable entries: {}", self.unreadable)?;
        }
        if let Some(s) = &self.lengths {
            writeln!(
                f,
                "token lengths ({} samples): p50 {}, p90 {}, p99 {}, max {}",
                s.count, s.p50, s.p90, s.p99, s.max
            )?;
        }
        if let Some(max) = self.max_length {
            writeln!(
                f,
                "over max_length {max}: {} (dropped with overlength = \"drop\")",
                self.over_length
            )?;
        }
        if self.problems.is_empty() {
            return writeln!(f, "no problems found");
        }
        writeln!(f, "{} problem(s):", self.problems.len())?;
        let mut counts: Vec<(ProblemKind, usize)> = Vec::new();
        for p in &self.problems {
            match counts.iter_mut().find(|(k, _)| *k == p.kind) {
                Some((_, n)) => *n += 1,
                None => counts.push((p.kind, 1)),
            }
        }
        counts.sort();
        let summary: Vec<String> = counts
            .iter()
            .map(|(k, n)| format!("{} {n}", k.label()))
            .collect();
        writeln!(f, "  by kind: {}", summary.join(", "))?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Validates a dataset file: opens it with `options` and checks every record.
pub fn validate_dataset(
    path: &Path,
    options: &DatasetOptions,
    checks: &Checks,
) -> ValidationReport {
    let dataset = match Dataset::open(path, options.clone()) {
        Ok(dataset) => dataset,
        Err(e) => return file_problem(&e, checks),
    };
    match dataset.records() {
        Ok(records) => validate_records(records, checks),
        Err(e) => file_problem(&e, checks),
    }
}

fn file_problem(e: &DatasetError, checks: &Checks) -> ValidationReport {
    let (kind, message) = match e {
        DatasetError::Io { source, .. } => (ProblemKind::Io, source.to_string()),
        DatasetError::Json(r) => (ProblemKind::Json, r.message.clone()),
    };
    ValidationReport {
        problems: vec![Problem {
            location: e.location(),
            kind,
            message,
        }],
        max_length: checks.max_length,
        ..Default::default()
    }
}

/// Validates records from any source (several files chained, an in-memory list...).
pub fn validate_records<I>(records: I, checks: &Checks) -> ValidationReport
where
    I: IntoIterator<Item = Result<Record, RecordError>>,
{
    let mut checker = Checker::new(checks);
    let mut report = ValidationReport {
        max_length: checks.max_length,
        ..Default::default()
    };
    let mut lengths = Vec::new();
    for item in records {
        let record = match item {
            Ok(record) => record,
            Err(e) => {
                report.unreadable += 1;
                report.problems.push(e.into());
                continue;
            }
        };
        report.samples += 1;
        match (record.images.is_empty(), record.videos.is_empty()) {
            (true, true) => report.text_only += 1,
            (images_empty, videos_empty) => {
                report.with_images += usize::from(!images_empty);
                report.with_videos += usize::from(!videos_empty);
            }
        }
        let result = checker.record(&record);
        report.over_length += result
            .problems
            .iter()
            .filter(|p| p.kind == ProblemKind::TooLong)
            .count();
        lengths.extend(result.length);
        report.problems.extend(result.problems);
    }
    report.lengths = LengthStats::from_lengths(&lengths);
    report
}

/// Runs the checks, remembering media results so a file shared by many records is decoded
/// once per validation run.
struct Checker<'c, 'a> {
    checks: &'c Checks<'a>,
    media_cache: HashMap<(bool, PathBuf), Result<(), (ProblemKind, String)>>,
}

impl<'c, 'a> Checker<'c, 'a> {
    fn new(checks: &'c Checks<'a>) -> Self {
        Checker {
            checks,
            media_cache: HashMap::new(),
        }
    }

    fn record(&mut self, record: &Record) -> RecordCheck {
        let mut problems = Vec::new();
        let problem = |kind, message: String| Problem {
            location: record.location.clone(),
            kind,
            message,
        };
        if let Some(message) = role_order_problem(record) {
            problems.push(problem(ProblemKind::RoleOrder, message));
        }
        for (i, turn) in record.conversation.turns.iter().enumerate() {
            let empty = turn.parts.iter().all(|p| match p {
                Part::Text { text } => text.trim().is_empty(),
                Part::Image { .. } | Part::Video { .. } => false,
            });
            if empty {
                problems.push(problem(
                    ProblemKind::EmptyTurn,
                    format!("turn {} ({}) is empty", i + 1, turn.role.as_str()),
                ));
            }
        }
        let (image_refs, video_refs) = count_refs(record);
        for (refs, paths, what) in [
            (image_refs, record.images.len(), "image"),
            (video_refs, record.videos.len(), "video"),
        ] {
            if refs != paths {
                problems.push(problem(
                    ProblemKind::PlaceholderMismatch,
                    format!(
                        "the conversation has {refs} {what} placeholder(s) but the record \
                         lists {paths} {what}(s)"
                    ),
                ));
            }
        }
        if self.checks.media != MediaCheck::Skip {
            for (is_image, paths) in [(true, &record.images), (false, &record.videos)] {
                for path in paths {
                    if let Err((kind, message)) = self.media(is_image, path) {
                        problems.push(problem(kind, message));
                    }
                }
            }
        }
        let mut length = None;
        if problems.is_empty() {
            if let Some(token_length) = self.checks.token_length {
                match token_length(record) {
                    Ok(n) => {
                        length = Some(n);
                        if let Some(max) = self.checks.max_length.filter(|max| n > *max) {
                            problems.push(problem(
                                ProblemKind::TooLong,
                                format!("{n} tokens after media expansion, over max_length {max}"),
                            ));
                        }
                    }
                    Err(e) => problems.push(problem(
                        ProblemKind::Length,
                        format!("cannot compute the token length: {e:#}"),
                    )),
                }
            }
        }
        RecordCheck { problems, length }
    }

    fn media(&mut self, is_image: bool, path: &Path) -> Result<(), (ProblemKind, String)> {
        let key = (is_image, path.to_path_buf());
        if let Some(cached) = self.media_cache.get(&key) {
            return cached.clone();
        }
        let what = if is_image { "image" } else { "video" };
        let result = if !path.exists() {
            Err((
                ProblemKind::MissingMedia,
                format!("{what} {} does not exist", path.display()),
            ))
        } else if !path.is_file() {
            let kind = if is_image {
                ProblemKind::BadImage
            } else {
                ProblemKind::BadVideo
            };
            Err((kind, format!("{what} {} is not a file", path.display())))
        } else if self.checks.media == MediaCheck::Exists {
            Ok(())
        } else if is_image {
            check_image(path).map_err(|m| (ProblemKind::BadImage, m))
        } else {
            match self.checks.video_check {
                Some(check) => check(path).map_err(|e| {
                    (
                        ProblemKind::BadVideo,
                        format!("video {}: {e:#}", path.display()),
                    )
                }),
                None => Ok(()),
            }
        };
        self.media_cache.insert(key, result.clone());
        result
    }
}

/// Decodes the whole image: reading only the header would miss truncated files.
fn check_image(path: &Path) -> Result<(), String> {
    let shown = path.display();
    let reader = image::ImageReader::open(path)
        .map_err(|e| format!("cannot open image {shown}: {e}"))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read image {shown}: {e}"))?;
    if reader.format().is_none() {
        return Err(format!("{shown} is not an image in a supported format"));
    }
    reader
        .decode()
        .map(|_| ())
        .map_err(|e| format!("cannot decode image {shown}: {e}"))
}

fn count_refs(record: &Record) -> (usize, usize) {
    let mut counts = (0, 0);
    for part in record.conversation.turns.iter().flat_map(|t| &t.parts) {
        match part {
            Part::Image { .. } => counts.0 += 1,
            Part::Video { .. } => counts.1 += 1,
            Part::Text { .. } => {}
        }
    }
    counts
}

/// Optional system turn first, then user / assistant alternating from user, ending with the
/// assistant. Only the first departure is reported, since later ones usually follow from it.
fn role_order_problem(record: &Record) -> Option<String> {
    let turns = &record.conversation.turns;
    let body = match turns.first() {
        None => return Some("the conversation has no turns".into()),
        Some(t) if t.role == Role::System => &turns[1..],
        Some(_) => &turns[..],
    };
    let offset = turns.len() - body.len();
    if body.is_empty() {
        return Some("the conversation has only a system turn".into());
    }
    for (i, turn) in body.iter().enumerate() {
        let expected = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if turn.role != expected {
            let n = i + offset + 1;
            return Some(if turn.role == Role::System {
                format!("turn {n} is a system turn; a system turn may only come first")
            } else {
                format!(
                    "turn {n} is from the {} but a {} turn was expected (turns must alternate \
                     user / assistant, starting with the user)",
                    turn.role.as_str(),
                    expected.as_str()
                )
            });
        }
    }
    if body.len() % 2 == 1 {
        return Some(
            "the last turn is from the user; a conversation must end with an assistant reply"
                .into(),
        );
    }
    None
}
