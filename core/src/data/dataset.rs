//! Dataset files: LLaVA / lmms-finetune records (`conversations`) and OpenAI-style records
//! (`messages`), in a JSON array or in JSONL, turned into [`Record`]s.
//!
//! The container is detected per file (first non-blank byte `[` → JSON array, anything else →
//! JSONL) and the record format per record (`messages` → OpenAI, otherwise LLaVA), so one
//! file may mix both. `docs/dataset.md` is the user-facing description of every rule here.
//!
//! JSON arrays are read whole (as lmms-finetune does) but kept as text plus the byte span of
//! each element, so random access is cheap and one malformed element does not hide the
//! others. JSONL is streamed line by line and never held in memory.

mod array;
mod parse;

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::Conversation;

pub use array::ArrayRecords;

/// Where a record (or an error) came from, for messages a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceLocation {
    pub file: PathBuf,
    /// 1-based line of the record's first byte (of the error itself for JSON errors).
    pub line: Option<usize>,
    /// 1-based byte column, only for JSON syntax errors.
    pub column: Option<usize>,
    /// 0-based index of the record in the file (blank JSONL lines are not counted). `None`
    /// only for file-level errors, e.g. a JSON array whose brackets do not match.
    pub index: Option<usize>,
}

impl SourceLocation {
    pub fn file_only(file: impl Into<PathBuf>) -> Self {
        SourceLocation {
            file: file.into(),
            line: None,
            column: None,
            index: None,
        }
    }
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if let Some(index) = self.index {
            write!(f, " (record {index})")?;
        }
        Ok(())
    }
}

/// One training sample as read from the dataset, before any media is decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Media parts refer to `images` / `videos` by index, in placeholder order. The counts
    /// are not guaranteed to match (that is reported by `validate::check_record`, so a
    /// dataset with a bad record can still be read and the problem reported with the rest).
    pub conversation: Conversation,
    /// Resolved paths: absolute paths as given, relative ones joined to the image folder.
    pub images: Vec<PathBuf>,
    pub videos: Vec<PathBuf>,
    /// The record's `id`, if it had one (numbers are turned into their decimal text).
    pub id: Option<String>,
    pub location: SourceLocation,
}

/// How records are read. The defaults match lmms-finetune's `human` / `gpt` role names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetOptions {
    /// Role name of user turns in `conversations[].from`; `user` is always accepted too.
    pub user_role: String,
    /// Role name of assistant turns; `assistant` is always accepted too.
    pub assistant_role: String,
    /// Role name of system turns; `system` is always accepted too.
    pub system_role: String,
    /// Base of relative image paths; `None` means the dataset file's directory.
    pub image_folder: Option<PathBuf>,
    /// Base of relative video paths; `None` means the dataset file's directory.
    pub video_folder: Option<PathBuf>,
    pub image_placeholder: String,
    pub video_placeholder: String,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        DatasetOptions {
            user_role: "human".into(),
            assistant_role: "gpt".into(),
            system_role: "system".into(),
            image_folder: None,
            video_folder: None,
            image_placeholder: "<image>".into(),
            video_placeholder: "<video>".into(),
        }
    }
}

/// What went wrong with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordErrorKind {
    /// The text is not valid JSON (or not valid UTF-8).
    Json,
    /// Valid JSON, but not a record we understand (missing `conversations`, unknown role...).
    Schema,
    /// The file could not be read part-way through.
    Io,
}

/// A record that could not be read; the message says why in the user's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {}{message}", kind_prefix(*.kind))]
pub struct RecordError {
    pub location: SourceLocation,
    pub kind: RecordErrorKind,
    pub message: String,
}

fn kind_prefix(kind: RecordErrorKind) -> &'static str {
    match kind {
        RecordErrorKind::Json => "invalid JSON: ",
        RecordErrorKind::Schema => "",
        RecordErrorKind::Io => "read error: ",
    }
}

/// A dataset file that cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read dataset {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The JSON array as a whole is broken (brackets, strings), so no record can be located.
    #[error("{0}")]
    Json(RecordError),
}

impl DatasetError {
    /// The location to report, for callers that collect problems.
    pub fn location(&self) -> SourceLocation {
        match self {
            DatasetError::Io { path, .. } => SourceLocation::file_only(path),
            DatasetError::Json(e) => e.location.clone(),
        }
    }
}

/// The container format of a dataset file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetFormat {
    /// One JSON array of records (`.json`).
    JsonArray,
    /// One record per line (`.jsonl`), streamed.
    JsonLines,
}

/// An opened dataset file.
#[derive(Debug)]
pub struct Dataset {
    path: PathBuf,
    options: DatasetOptions,
    array: Option<array::ArrayData>,
}

impl Dataset {
    /// Opens `path` and detects its container. A JSON array is read and its elements located
    /// now; a JSONL file is only peeked at, and read when [`Dataset::records`] is iterated.
    pub fn open(path: impl AsRef<Path>, options: DatasetOptions) -> Result<Self, DatasetError> {
        let path = path.as_ref().to_path_buf();
        let io_err = |source| DatasetError::Io {
            path: path.clone(),
            source,
        };
        let mut reader = BufReader::new(File::open(&path).map_err(io_err)?);
        let mut at_start = true;
        let is_array = loop {
            let buf = reader.fill_buf().map_err(io_err)?;
            if buf.is_empty() {
                break false;
            }
            let mut skip = 0;
            if at_start && buf.starts_with(&[0xEF, 0xBB, 0xBF]) {
                skip = 3; // UTF-8 byte-order mark
            }
            at_start = false;
            skip += buf[skip..]
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
            if skip < buf.len() {
                break buf[skip] == b'[';
            }
            reader.consume(skip);
        };
        drop(reader);
        let array = if is_array {
            // Read from the start again so line numbers count the skipped blank lines.
            let text = std::fs::read_to_string(&path).map_err(io_err)?;
            Some(array::ArrayData::parse(&path, text).map_err(DatasetError::Json)?)
        } else {
            None
        };
        Ok(Dataset {
            path,
            options,
            array,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn options(&self) -> &DatasetOptions {
        &self.options
    }

    pub fn format(&self) -> DatasetFormat {
        if self.array.is_some() {
            DatasetFormat::JsonArray
        } else {
            DatasetFormat::JsonLines
        }
    }

    /// Number of records, where known without reading the file again (JSON arrays only).
    pub fn len(&self) -> Option<usize> {
        self.array.as_ref().map(|a| a.len())
    }

    /// Whether the dataset is known to hold no records (JSON arrays only).
    pub fn is_empty(&self) -> Option<bool> {
        self.len().map(|n| n == 0)
    }

    /// Random access to a JSON-array record (parsed on each call). `None` past the end or for
    /// JSONL, which has no index.
    pub fn get(&self, index: usize) -> Option<Result<Record, RecordError>> {
        let array = self.array.as_ref()?;
        array.record(index, &self.path, &self.options)
    }

    /// Every record in file order; a bad record is an `Err` item and iteration goes on.
    /// For JSONL this reopens the file and streams it.
    pub fn records(&self) -> Result<Records<'_>, DatasetError> {
        match &self.array {
            Some(array) => Ok(Records(RecordsInner::Array(ArrayRecords::new(
                array,
                &self.path,
                &self.options,
            )))),
            None => {
                let file = File::open(&self.path).map_err(|source| DatasetError::Io {
                    path: self.path.clone(),
                    source,
                })?;
                Ok(Records(RecordsInner::Lines(Box::new(JsonlRecords::new(
                    BufReader::new(file),
                    self.path.clone(),
                    self.options.clone(),
                )))))
            }
        }
    }
}

/// Iterator over a dataset's records, whichever the container.
pub struct Records<'a>(RecordsInner<'a>);

enum RecordsInner<'a> {
    Array(ArrayRecords<'a>),
    Lines(Box<JsonlRecords<BufReader<File>>>),
}

impl Iterator for Records<'_> {
    type Item = Result<Record, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            RecordsInner::Array(it) => it.next(),
            RecordsInner::Lines(it) => it.next(),
        }
    }
}

/// Streams JSONL records from any reader, one line at a time.
///
/// Generic over the reader so that callers (and tests) can feed a pipe or a decompressor;
/// `file` is only used in locations and as the base of relative media paths.
pub struct JsonlRecords<R> {
    reader: R,
    file: PathBuf,
    options: DatasetOptions,
    line: usize,
    index: usize,
    buf: Vec<u8>,
    done: bool,
}

impl<R: BufRead> JsonlRecords<R> {
    pub fn new(reader: R, file: PathBuf, options: DatasetOptions) -> Self {
        JsonlRecords {
            reader,
            file,
            options,
            line: 0,
            index: 0,
            buf: Vec::new(),
            done: false,
        }
    }

    /// Lines read so far, so a caller can see how far into the file the stream is.
    pub fn lines_read(&self) -> usize {
        self.line
    }

    fn location(&self, column: Option<usize>) -> SourceLocation {
        SourceLocation {
            file: self.file.clone(),
            line: Some(self.line),
            column,
            index: Some(self.index),
        }
    }
}

impl<R: BufRead> Iterator for JsonlRecords<R> {
    type Item = Result<Record, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => {
                    self.done = true;
                    return None;
                }
                Ok(_) => self.line += 1,
                Err(e) => {
                    self.done = true;
                    return Some(Err(RecordError {
                        location: self.location(None),
                        kind: RecordErrorKind::Io,
                        message: e.to_string(),
                    }));
                }
            }
            if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let result = match std::str::from_utf8(&self.buf) {
                Err(e) => Err(RecordError {
                    location: self.location(Some(e.valid_up_to() + 1)),
                    kind: RecordErrorKind::Json,
                    message: "line is not valid UTF-8".into(),
                }),
                Ok(text) => {
                    // A UTF-8 byte-order mark may start the first line.
                    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
                    // Without the line end, an early EOF is placed on this line, not after it.
                    let text = text.trim_end_matches(['\n', '\r']);
                    match serde_json::from_str::<serde_json::Value>(text) {
                        Err(e) => Err(RecordError {
                            location: self.location(Some(e.column())),
                            kind: RecordErrorKind::Json,
                            message: json_message(&e),
                        }),
                        Ok(value) => {
                            parse::parse_record(&value, self.location(None), &self.options)
                        }
                    }
                }
            };
            self.index += 1;
            return Some(result);
        }
        None
    }
}

/// Parses one record already read as JSON, for callers holding records from elsewhere.
pub fn parse_record(
    value: &serde_json::Value,
    location: SourceLocation,
    options: &DatasetOptions,
) -> Result<Record, RecordError> {
    parse::parse_record(value, location, options)
}

/// serde_json's message without its " at line L column C" tail, which would give positions
/// relative to the fragment parsed rather than to the file; callers put the file position in
/// the [`SourceLocation`] instead.
pub(crate) fn json_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let tail = format!(" at line {} column {}", e.line(), e.column());
    match full.strip_suffix(&tail) {
        Some(msg) => msg.to_string(),
        None => full,
    }
}
