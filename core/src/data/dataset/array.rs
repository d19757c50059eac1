//! JSON-array datasets, kept as text plus the span of each top-level element.
//!
//! Locating elements with a small bracket/string scanner (instead of parsing the whole array
//! into `serde_json::Value`s) gives each record its line number, lets one malformed element
//! be reported without losing the others, and keeps memory near the file size. Only when the
//! scanner cannot find the elements at all (unbalanced brackets, an unterminated string)
//! is the file rejected as a whole, with serde_json's line and column.

use std::path::Path;

use super::{
    json_message, parse, DatasetOptions, Record, RecordError, RecordErrorKind, SourceLocation,
};

#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    /// 1-based line and byte column of `start`.
    line: usize,
    column: usize,
}

#[derive(Debug)]
pub(super) struct ArrayData {
    text: String,
    spans: Vec<Span>,
}

impl ArrayData {
    pub(super) fn parse(path: &Path, text: String) -> Result<Self, RecordError> {
        match scan(&text) {
            Ok(spans) => Ok(ArrayData { text, spans }),
            Err(scan_error) => {
                // Let serde_json find the exact position; fall back to the scanner's own
                // finding if serde_json (unexpectedly) accepts the text.
                let (line, column, message) = match serde_json::from_str::<serde_json::Value>(&text)
                {
                    Err(e) => (e.line(), e.column(), json_message(&e)),
                    Ok(_) => (scan_error.line, scan_error.column, scan_error.message),
                };
                Err(RecordError {
                    location: SourceLocation {
                        file: path.to_path_buf(),
                        line: Some(line),
                        column: Some(column),
                        index: None,
                    },
                    kind: RecordErrorKind::Json,
                    message,
                })
            }
        }
    }

    pub(super) fn len(&self) -> usize {
        self.spans.len()
    }

    pub(super) fn record(
        &self,
        index: usize,
        path: &Path,
        options: &DatasetOptions,
    ) -> Option<Result<Record, RecordError>> {
        let span = *self.spans.get(index)?;
        let location = SourceLocation {
            file: path.to_path_buf(),
            line: Some(span.line),
            column: None,
            index: Some(index),
        };
        let text = &self.text[span.start..span.end];
        Some(match serde_json::from_str::<serde_json::Value>(text) {
            Ok(value) => parse::parse_record(&value, location, options),
            Err(e) => {
                // serde_json counts from the element's first byte; move it to the file.
                let line = span.line + e.line().saturating_sub(1);
                let column = if e.line() <= 1 {
                    span.column + e.column().saturating_sub(1)
                } else {
                    e.column()
                };
                Err(RecordError {
                    location: SourceLocation {
                        line: Some(line),
                        column: Some(column),
                        ..location
                    },
                    kind: RecordErrorKind::Json,
                    message: json_message(&e),
                })
            }
        })
    }
}

/// Iterator over a JSON array's records in order.
pub struct ArrayRecords<'a> {
    data: &'a ArrayData,
    path: &'a Path,
    options: &'a DatasetOptions,
    next: usize,
}

impl<'a> ArrayRecords<'a> {
    pub(super) fn new(data: &'a ArrayData, path: &'a Path, options: &'a DatasetOptions) -> Self {
        ArrayRecords {
            data,
            path,
            options,
            next: 0,
        }
    }
}

impl Iterator for ArrayRecords<'_> {
    type Item = Result<Record, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.data.record(self.next, self.path, self.options)?;
        self.next += 1;
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.data.len().saturating_sub(self.next);
        (left, Some(left))
    }
}

struct ScanError {
    line: usize,
    column: usize,
    message: String,
}

/// Finds the byte spans of the top-level elements of a JSON array. Checks only what is needed
/// to find element boundaries (brackets nest properly, strings end, commas separate);
/// everything inside an element is left to serde_json. The fallback error uses the same
/// `Value` parse as elements do, so the file-level and element-level verdicts agree.
fn scan(text: &str) -> Result<Vec<Span>, ScanError> {
    let bytes = text.as_bytes();
    let mut pos = 0;
    let mut line = 1;
    let mut line_start = 0;
    let err = |pos: usize, line: usize, line_start: usize, message: &str| ScanError {
        line,
        column: pos - line_start + 1,
        message: message.to_string(),
    };

    // Skips whitespace (and a byte-order mark), keeping the line count.
    let skip_ws = |pos: &mut usize, line: &mut usize, line_start: &mut usize| {
        while *pos < bytes.len() {
            match bytes[*pos] {
                b'\n' => {
                    *line += 1;
                    *line_start = *pos + 1;
                    *pos += 1;
                }
                b' ' | b'\t' | b'\r' => *pos += 1,
                0xEF if bytes[*pos..].starts_with(&[0xEF, 0xBB, 0xBF]) => *pos += 3,
                _ => break,
            }
        }
    };

    skip_ws(&mut pos, &mut line, &mut line_start);
    if bytes.get(pos) != Some(&b'[') {
        return Err(err(pos, line, line_start, "expected `[`"));
    }
    pos += 1;
    let mut spans = Vec::new();
    skip_ws(&mut pos, &mut line, &mut line_start);
    if bytes.get(pos) == Some(&b']') {
        pos += 1;
    } else {
        loop {
            skip_ws(&mut pos, &mut line, &mut line_start);
            let start = pos;
            let (start_line, start_column) = (line, pos - line_start + 1);
            let mut stack: Vec<u8> = Vec::new();
            let mut in_string = false;
            let mut end = None;
            while pos < bytes.len() {
                let b = bytes[pos];
                if in_string {
                    match b {
                        b'\\' => pos += 1,
                        b'"' => in_string = false,
                        b'\n' => {
                            line += 1;
                            line_start = pos + 1;
                        }
                        _ => {}
                    }
                    pos += 1;
                    continue;
                }
                match b {
                    b'"' => in_string = true,
                    b'{' => stack.push(b'}'),
                    b'[' => stack.push(b']'),
                    b'}' | b']' if stack.last() == Some(&b) => {
                        stack.pop();
                    }
                    b'}' | b']' if !stack.is_empty() => {
                        return Err(err(pos, line, line_start, "mismatched bracket"));
                    }
                    b',' | b']' if stack.is_empty() => {
                        end = Some(b);
                        break;
                    }
                    b'}' => return Err(err(pos, line, line_start, "unexpected `}`")),
                    b'\n' => {
                        line += 1;
                        line_start = pos + 1;
                    }
                    _ => {}
                }
                pos += 1;
            }
            let Some(delimiter) = end else {
                return Err(err(pos, line, line_start, "the array is not closed"));
            };
            let element = text[start..pos].trim_end();
            if element.is_empty() {
                return Err(err(pos, line, line_start, "expected a value"));
            }
            spans.push(Span {
                start,
                end: start + element.len(),
                line: start_line,
                column: start_column,
            });
            pos += 1;
            if delimiter == b']' {
                break;
            }
        }
    }
    skip_ws(&mut pos, &mut line, &mut line_start);
    if pos < bytes.len() {
        return Err(err(
            pos,
            line,
            line_start,
            "trailing characters after the array",
        ));
    }
    Ok(spans)
}
