//! Dataset formats: LLaVA and OpenAI records in JSON arrays and JSONL, placeholder splitting,
//! path resolution, role names, streaming and error locations. Expected conversations are
//! written out by hand from the dataset text.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use lmms_ft_core::data::dataset::{
    Dataset, DatasetFormat, DatasetOptions, JsonlRecords, Record, RecordError, RecordErrorKind,
};
use lmms_ft_core::data::{Conversation, Part, Role, Turn};
use serde_json::json;

fn text(t: &str) -> Part {
    Part::Text { text: t.into() }
}
fn img(index: usize) -> Part {
    Part::Image { index }
}
fn vid(index: usize) -> Part {
    Part::Video { index }
}
fn turn(role: Role, parts: Vec<Part>) -> Turn {
    Turn { role, parts }
}
fn conv(turns: Vec<Turn>) -> Conversation {
    Conversation { turns }
}

fn options() -> DatasetOptions {
    DatasetOptions {
        image_folder: Some("/data/images".into()),
        video_folder: Some("/data/videos".into()),
        ..Default::default()
    }
}

/// Writes records as a JSON array with record `i` alone on line `i + 2`.
fn write_array(path: &Path, records: &[serde_json::Value]) {
    let body: Vec<String> = records.iter().map(|r| format!("  {r}")).collect();
    std::fs::write(path, format!("[\n{}\n]\n", body.join(",\n"))).unwrap();
}

/// Writes records as JSONL with a blank line after the second record.
fn write_jsonl(path: &Path, records: &[serde_json::Value]) {
    let mut text = String::new();
    for (i, r) in records.iter().enumerate() {
        text.push_str(&format!("{r}\n"));
        if i == 1 {
            text.push_str("   \n");
        }
    }
    std::fs::write(path, text).unwrap();
}

/// Conversation, image paths and video paths expected for one record.
type Expected = (Conversation, Vec<PathBuf>, Vec<PathBuf>);

/// The mixed LLaVA dataset and, for each record, the expected (conversation, images, videos).
fn llava_mixed() -> (Vec<serde_json::Value>, Vec<Expected>) {
    let records = vec![
        // text-only
        json!({"id": "t0", "conversations": [
            {"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}]}),
        // one image, conventional leading "<image>\n"
        json!({"id": 1, "image": "cats/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}),
        // several images interleaved mid-text, one absolute
        json!({"image": ["a.png", "/abs/b.png"], "conversations": [
            {"from": "human", "value": "Compare <image> with\n<image> please."},
            {"from": "gpt", "value": "Same cat."}]}),
        // a video
        json!({"video": "clip.mp4", "conversations": [
            {"from": "human", "value": "<video>\nDescribe."}, {"from": "gpt", "value": "Rain."}]}),
        // media without placeholders: prepended to the first user turn
        json!({"image": "a.png", "video": ["v1.mp4", "v2.mp4"], "conversations": [
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "Ok."}]}),
        // system prompt, several turns, a second image in a later turn, standard role names
        json!({"system_prompt": "You are terse.", "image": ["x.png", "y.png"], "conversations": [
            {"from": "human", "value": "<image><image>\nFirst?"}, {"from": "gpt", "value": "Dog."},
            {"from": "user", "value": "And\n<image>?"}, {"from": "assistant", "value": "None."}]}),
    ];
    let i = |p: &str| PathBuf::from("/data/images").join(p);
    let v = |p: &str| PathBuf::from("/data/videos").join(p);
    use Role::*;
    let expected = vec![
        (
            conv(vec![
                turn(User, vec![text("Hello?")]),
                turn(Assistant, vec![text("Hi.")]),
            ]),
            vec![],
            vec![],
        ),
        (
            conv(vec![
                turn(User, vec![img(0), text("What is this?")]),
                turn(Assistant, vec![text("A cat.")]),
            ]),
            vec![i("cats/a.png")],
            vec![],
        ),
        (
            conv(vec![
                turn(
                    User,
                    vec![
                        text("Compare "),
                        img(0),
                        text(" with\n"),
                        img(1),
                        text(" please."),
                    ],
                ),
                turn(Assistant, vec![text("Same cat.")]),
            ]),
            vec![i("a.png"), PathBuf::from("/abs/b.png")],
            vec![],
        ),
        (
            conv(vec![
                turn(User, vec![vid(0), text("Describe.")]),
                turn(Assistant, vec![text("Rain.")]),
            ]),
            vec![],
            vec![v("clip.mp4")],
        ),
        (
            conv(vec![
                turn(User, vec![img(0), vid(0), vid(1), text("Describe it.")]),
                turn(Assistant, vec![text("Ok.")]),
            ]),
            vec![i("a.png")],
            vec![v("v1.mp4"), v("v2.mp4")],
        ),
        (
            conv(vec![
                turn(System, vec![text("You are terse.")]),
                turn(User, vec![img(0), img(1), text("First?")]),
                turn(Assistant, vec![text("Dog.")]),
                turn(User, vec![text("And\n"), img(2), text("?")]),
                turn(Assistant, vec![text("None.")]),
            ]),
            vec![i("x.png"), i("y.png")],
            vec![],
        ),
    ];
    (records, expected)
}

fn check(records: &[Record], expected: &[Expected]) {
    assert_eq!(records.len(), expected.len());
    for (k, (r, (c, images, videos))) in records.iter().zip(expected).enumerate() {
        assert_eq!(&r.conversation, c, "record {k}");
        assert_eq!(&r.images, images, "record {k}");
        assert_eq!(&r.videos, videos, "record {k}");
        assert_eq!(r.location.index, Some(k));
    }
}

fn collect(ds: &Dataset) -> Vec<Record> {
    ds.records().unwrap().map(|r| r.unwrap()).collect()
}

#[test]
fn llava_json_array_mixed_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.json");
    let (records, expected) = llava_mixed();
    write_array(&path, &records);
    let ds = Dataset::open(&path, options()).unwrap();
    assert_eq!(ds.format(), DatasetFormat::JsonArray);
    assert_eq!(ds.len(), Some(6));
    let got = collect(&ds);
    check(&got, &expected);
    // Record i sits on line i + 2 of the file.
    let lines: Vec<_> = got.iter().map(|r| r.location.line).collect();
    assert_eq!(lines, (2..8).map(Some).collect::<Vec<_>>());
    assert_eq!(got[0].id.as_deref(), Some("t0"));
    assert_eq!(got[1].id.as_deref(), Some("1"));
    assert_eq!(got[0].location.file, path);
    // Random access agrees with iteration.
    assert_eq!(ds.get(3).unwrap().unwrap(), got[3]);
    assert!(ds.get(6).is_none());
}

#[test]
fn llava_jsonl_same_records_with_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.jsonl");
    let (records, expected) = llava_mixed();
    write_jsonl(&path, &records);
    let ds = Dataset::open(&path, options()).unwrap();
    assert_eq!(ds.format(), DatasetFormat::JsonLines);
    assert_eq!(ds.len(), None);
    let got = collect(&ds);
    check(&got, &expected);
    // Line 3 is blank: records 2.. are one line further down; indices do not count it.
    let lines: Vec<_> = got.iter().map(|r| r.location.line.unwrap()).collect();
    assert_eq!(lines, vec![1, 2, 4, 5, 6, 7]);
}

#[test]
fn openai_messages_in_array_and_jsonl() {
    let records = vec![
        json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "Look: "},
                {"type": "image", "image": "a.png"},
                {"type": "text", "text": " and "},
                {"type": "image_url", "image_url": {"url": "file:///abs/c.png"}},
                {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "Both cats."}]}),
        json!({"messages": [
            {"role": "user", "content": [
                {"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "What happens?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "It rains."}]}]}),
        // top-level media lists referenced by placeholders and path-less parts
        json!({"images": ["p.png", "q.png"], "messages": [
            {"role": "user", "content": "<image>\nThis, then "},
            {"role": "assistant", "content": "Ok."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "that."}]},
            {"role": "assistant", "content": "Done."}]}),
        json!({"messages": [{"role": "user", "content": "Plain?"}, {"role": "assistant", "content": "Yes."}]}),
        // a LLaVA record in the same file
        json!({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}),
    ];
    let i = |p: &str| PathBuf::from("/data/images").join(p);
    use Role::*;
    let expected = vec![
        (
            conv(vec![
                turn(System, vec![text("Be brief.")]),
                turn(
                    User,
                    vec![text("Look: "), img(0), text(" and "), img(1), text("?")],
                ),
                turn(Assistant, vec![text("Both cats.")]),
            ]),
            vec![i("a.png"), PathBuf::from("/abs/c.png")],
            vec![],
        ),
        (
            conv(vec![
                turn(User, vec![vid(0), text("What happens?")]),
                turn(Assistant, vec![text("It rains.")]),
            ]),
            vec![],
            vec![PathBuf::from("/data/videos/clip.mp4")],
        ),
        (
            conv(vec![
                turn(User, vec![img(0), text("This, then ")]),
                turn(Assistant, vec![text("Ok.")]),
                turn(User, vec![img(1), text("that.")]),
                turn(Assistant, vec![text("Done.")]),
            ]),
            vec![i("p.png"), i("q.png")],
            vec![],
        ),
        (
            conv(vec![
                turn(User, vec![text("Plain?")]),
                turn(Assistant, vec![text("Yes.")]),
            ]),
            vec![],
            vec![],
        ),
        (
            conv(vec![
                turn(User, vec![text("Hi")]),
                turn(Assistant, vec![text("Hey")]),
            ]),
            vec![],
            vec![],
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let array = dir.path().join("msgs.json");
    let lines = dir.path().join("msgs.jsonl");
    write_array(&array, &records);
    write_jsonl(&lines, &records);
    let a = Dataset::open(&array, options()).unwrap();
    let l = Dataset::open(&lines, options()).unwrap();
    assert_eq!(a.format(), DatasetFormat::JsonArray);
    assert_eq!(l.format(), DatasetFormat::JsonLines);
    check(&collect(&a), &expected);
    check(&collect(&l), &expected);
}

#[test]
fn relative_paths_default_to_the_dataset_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join("d.jsonl");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let rec = json!({"image": ["rel/a.png", "/abs/b.png"], "video": "v.mp4", "conversations": [
        {"from": "human", "value": "<image><image><video>"}, {"from": "gpt", "value": "x"}]});
    std::fs::write(&path, format!("{rec}\n")).unwrap();
    let got = collect(&Dataset::open(&path, DatasetOptions::default()).unwrap());
    let base = dir.path().join("sub");
    assert_eq!(
        got[0].images,
        vec![base.join("rel/a.png"), PathBuf::from("/abs/b.png")]
    );
    assert_eq!(got[0].videos, vec![base.join("v.mp4")]);
    // With folders, relative paths go under them; absolute ones stay.
    let got = collect(&Dataset::open(&path, options()).unwrap());
    assert_eq!(
        got[0].images,
        vec![
            PathBuf::from("/data/images/rel/a.png"),
            PathBuf::from("/abs/b.png")
        ]
    );
    assert_eq!(got[0].videos, vec![PathBuf::from("/data/videos/v.mp4")]);
}

#[test]
fn custom_role_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("roles.jsonl");
    let records = [
        json!({"conversations": [{"from": "sys", "value": "S"}, {"from": "USER", "value": "Q"},
            {"from": "BOT", "value": "A"}, {"from": "user", "value": "Q2"}, {"from": "assistant", "value": "A2"}]}),
        json!({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}),
    ];
    std::fs::write(&path, format!("{}\n{}\n", records[0], records[1])).unwrap();
    let opts = DatasetOptions {
        user_role: "USER".into(),
        assistant_role: "BOT".into(),
        system_role: "sys".into(),
        ..Default::default()
    };
    let got: Vec<_> = Dataset::open(&path, opts)
        .unwrap()
        .records()
        .unwrap()
        .collect();
    use Role::*;
    assert_eq!(
        got[0].as_ref().unwrap().conversation,
        conv(vec![
            turn(System, vec![text("S")]),
            turn(User, vec![text("Q")]),
            turn(Assistant, vec![text("A")]),
            turn(User, vec![text("Q2")]),
            turn(Assistant, vec![text("A2")]),
        ])
    );
    // The default names are not accepted once others are configured.
    let err = got[1].as_ref().unwrap_err();
    assert_eq!(err.kind, RecordErrorKind::Schema);
    assert!(
        err.message.contains("conversations[0].from") && err.message.contains("\"human\""),
        "{err}"
    );
    assert!(err.message.contains("\"USER\""), "{err}");
}

/// A reader that counts the bytes handed out, to prove the JSONL reader does not slurp.
struct Counting<R> {
    inner: R,
    served: Arc<AtomicUsize>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.served.fetch_add(n, Ordering::SeqCst);
        Ok(n)
    }
}

/// An endless JSONL stream: no reader that loads everything could return from it.
struct Endless {
    pending: Vec<u8>,
    next: usize,
}

impl Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pending.is_empty() {
            let rec = json!({"id": self.next, "conversations": [
                {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]});
            self.pending = format!("{rec}\n").into_bytes();
            self.next += 1;
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        Ok(n)
    }
}

#[test]
fn jsonl_is_streamed_record_by_record() {
    let good = json!({"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        "image": "a.png"});
    let mut text = String::new();
    for _ in 0..3000 {
        text.push_str(&format!("{good}\n"));
    }
    text.push_str("{\"conversations\": [\n"); // line 3001: broken
    let total = text.len();
    let served = Arc::new(AtomicUsize::new(0));
    let reader = BufReader::with_capacity(
        4096,
        Counting {
            inner: std::io::Cursor::new(text.into_bytes()),
            served: served.clone(),
        },
    );
    let mut it = JsonlRecords::new(reader, PathBuf::from("big.jsonl"), options());
    let first = it.next().unwrap().unwrap();
    assert_eq!(first.location.line, Some(1));
    assert_eq!(it.lines_read(), 1);
    let after_first = served.load(Ordering::SeqCst);
    assert!(
        after_first <= 4096 && after_first < total / 10,
        "read {after_first} of {total} bytes"
    );
    let second = it.next().unwrap().unwrap();
    assert_eq!(second.location.index, Some(1));
    let rest: Vec<_> = it.collect();
    assert_eq!(rest.len(), 2999);
    assert!(rest[..2998].iter().all(|r| r.is_ok()));
    let err = rest[2998].as_ref().unwrap_err();
    assert_eq!(err.kind, RecordErrorKind::Json);
    assert_eq!(
        (err.location.line, err.location.index),
        (Some(3001), Some(3000))
    );

    let endless = BufReader::new(Endless {
        pending: Vec::new(),
        next: 0,
    });
    let ids: Vec<String> = JsonlRecords::new(endless, PathBuf::from("pipe"), options())
        .take(5)
        .map(|r| r.unwrap().id.unwrap())
        .collect();
    assert_eq!(ids, ["0", "1", "2", "3", "4"]);
}

#[test]
fn jsonl_file_bad_line_late_keeps_earlier_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    let good =
        json!({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]});
    std::fs::write(
        &path,
        format!("{good}\n{good}\n\n{good}\n{{\"conversations\": [}}\n{good}\n"),
    )
    .unwrap();
    let got: Vec<_> = Dataset::open(&path, options())
        .unwrap()
        .records()
        .unwrap()
        .collect();
    assert_eq!(got.len(), 5);
    assert!(got[0].is_ok() && got[1].is_ok() && got[2].is_ok() && got[4].is_ok());
    let err = got[3].as_ref().unwrap_err();
    // serde_json on the line itself is the oracle for the column.
    let oracle = serde_json::from_str::<serde_json::Value>("{\"conversations\": [}").unwrap_err();
    assert_eq!(err.kind, RecordErrorKind::Json);
    assert_eq!(err.location.line, Some(5));
    assert_eq!(err.location.column, Some(oracle.column()));
    assert_eq!(err.location.index, Some(3));
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("{}:5:{}", path.display(), oracle.column())),
        "{shown}"
    );
    assert!(
        shown.contains("(record 3)") && shown.contains("invalid JSON"),
        "{shown}"
    );
}

#[test]
fn json_array_errors_name_file_line_and_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.json");
    let text = "[\n  {\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"a\"}]},\n  {\"conversations\": [\n    {\"from\": \"human\", \"value\": \"q\",},\n    {\"from\": \"gpt\", \"value\": \"a\"}]},\n  {\"image\": \"a.png\"},\n  {\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"bot\", \"value\": \"a\"}]},\n  {\"conversations\": [{\"from\": \"human\", \"value\": 7}]}\n]\n";
    std::fs::write(&path, text).unwrap();
    let ds = Dataset::open(&path, options()).unwrap();
    assert_eq!(ds.len(), Some(5));
    let got: Vec<Result<Record, RecordError>> = ds.records().unwrap().collect();
    assert!(got[0].is_ok());

    // Malformed element: same line and column as serde_json reports for the whole file.
    let oracle = serde_json::from_str::<serde_json::Value>(text).unwrap_err();
    let e = got[1].as_ref().unwrap_err();
    assert_eq!(e.kind, RecordErrorKind::Json);
    assert_eq!(
        (e.location.line, e.location.column),
        (Some(oracle.line()), Some(oracle.column()))
    );
    assert_eq!(oracle.line(), 4);
    assert_eq!(e.location.index, Some(1));

    let schema = |i: usize| got[i].as_ref().unwrap_err().clone();
    let missing = schema(2);
    assert_eq!(
        (missing.kind, missing.location.line, missing.location.index),
        (RecordErrorKind::Schema, Some(6), Some(2))
    );
    assert!(missing.message.contains("no `conversations`"), "{missing}");
    let role = schema(3);
    assert_eq!(role.location.line, Some(7));
    assert!(
        role.message.contains("conversations[1].from") && role.message.contains("\"bot\""),
        "{role}"
    );
    let value = schema(4);
    assert_eq!(value.location.line, Some(8));
    assert!(
        value
            .message
            .contains("conversations[0].value` must be a string, found a number"),
        "{value}"
    );
    let shown = value.to_string();
    assert!(
        shown.starts_with(&format!("{}:8 (record 4): ", path.display())),
        "{shown}"
    );
}

#[test]
fn broken_array_is_rejected_with_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.json");
    let text = "[\n  {\"conversations\": [{\"from\": \"human\", \"value\": \"q}]}\n]\n";
    std::fs::write(&path, text).unwrap();
    let err = Dataset::open(&path, options()).unwrap_err();
    let oracle = serde_json::from_str::<serde_json::Value>(text).unwrap_err();
    let loc = err.location();
    assert_eq!(
        (loc.line, loc.column),
        (Some(oracle.line()), Some(oracle.column()))
    );
    assert!(
        err.to_string().starts_with(&path.display().to_string()),
        "{err}"
    );

    let missing = Dataset::open(dir.path().join("nope.json"), options()).unwrap_err();
    assert!(missing.to_string().contains("nope.json"), "{missing}");
}

#[test]
fn bufread_trait_is_enough_for_jsonl() {
    // Any BufRead works (e.g. stdin or a decompressor), not only files.
    fn count<R: BufRead>(r: R) -> usize {
        JsonlRecords::new(r, PathBuf::from("-"), DatasetOptions::default())
            .filter(|r| r.is_ok())
            .count()
    }
    let line = json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]});
    assert_eq!(count(format!("{line}\n\n{line}").as_bytes()), 2);
}

#[test]
fn bom_and_leading_blank_lines_keep_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let rec =
        json!({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]});
    let array = dir.path().join("a.json");
    std::fs::write(&array, format!("\u{feff}\n\n[\n{rec},\n\n{rec}]")).unwrap();
    let got = collect(&Dataset::open(&array, options()).unwrap());
    let lines: Vec<_> = got.iter().map(|r| r.location.line).collect();
    assert_eq!(lines, vec![Some(4), Some(6)]);
    let jsonl = dir.path().join("a.jsonl");
    std::fs::write(&jsonl, format!("\u{feff}{rec}\n{rec}\n")).unwrap();
    assert_eq!(collect(&Dataset::open(&jsonl, options()).unwrap()).len(), 2);
}
