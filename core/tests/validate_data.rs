//! Validation: every seeded defect is reported with its location, and a clean dataset gets
//! the right counts and hand-computed length percentiles. Images are written with the
//! `image` crate; videos and token lengths come through the caller's closures.

use std::collections::HashMap;
use std::path::Path;

use lmms_ft_core::config::OnBadSample;
use lmms_ft_core::data::dataset::{Dataset, DatasetOptions, Record};
use lmms_ft_core::data::validate::{
    check_record, record_problems, screen_record, validate_dataset, Checks, LengthStats,
    MediaCheck, ProblemKind, ValidationReport,
};
use lmms_ft_core::data::{Part, RgbImage};
use serde_json::json;

fn write_images(dir: &Path) {
    let mut im = RgbImage::new(8, 6);
    for (x, y, p) in im.enumerate_pixels_mut() {
        *p = image::Rgb([(x * 30) as u8, (y * 40) as u8, 7]);
    }
    im.save(dir.join("ok.png")).unwrap();
    im.save(dir.join("ok2.jpg")).unwrap();
    // A PNG cut in half: the header reads fine, decoding fails.
    let mut png = Vec::new();
    im.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    std::fs::write(dir.join("corrupt.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(
        dir.join("notimage.jpg"),
        "this is a text file, not a JPEG\n",
    )
    .unwrap();
    std::fs::write(dir.join("good.mp4"), b"pretend video").unwrap();
    std::fs::write(dir.join("bad.mp4"), b"pretend broken video").unwrap();
}

/// Stands in for the video module: fails for files named bad*.
fn video_check(path: &Path) -> anyhow::Result<()> {
    match path.file_name().and_then(|n| n.to_str()) {
        Some(n) if n.starts_with("bad") => anyhow::bail!("no decodable video stream"),
        _ => Ok(()),
    }
}

/// Stands in for the template: characters of text + 100 per image + 50 per video.
fn token_length(record: &Record) -> anyhow::Result<usize> {
    let mut n = 0;
    for part in record.conversation.turns.iter().flat_map(|t| &t.parts) {
        n += match part {
            Part::Text { text } => text.chars().count(),
            Part::Image { .. } => 100,
            Part::Video { .. } => 50,
        };
    }
    Ok(n)
}

fn conv(user: &str, assistant: &str) -> serde_json::Value {
    json!([{"from": "human", "value": user}, {"from": "gpt", "value": assistant}])
}

#[test]
fn every_seeded_defect_is_reported_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    write_images(dir.path());
    let long = "x".repeat(300);
    let lines = [
        json!({"image": "ok.png", "conversations": conv("<image>\nWhat?", "A.")}).to_string(), // 1 clean
        "{\"conversations\": [".to_string(),                                                     // 2 bad JSON
        json!({"image": "missing.png", "conversations": conv("<image>", "A.")}).to_string(),  // 3
        json!({"image": "corrupt.png", "conversations": conv("<image>", "A.")}).to_string(),  // 4
        json!({"image": "notimage.jpg", "conversations": conv("<image>", "A.")}).to_string(), // 5
        json!({"image": ["ok.png"], "conversations": conv("<image> and <image>", "A.")}).to_string(), // 6
        json!({"conversations": [{"from": "gpt", "value": "A."}, {"from": "human", "value": "Q"}]}).to_string(), // 7
        json!({"conversations": conv("Q", "   ")}).to_string(),                              // 8 empty
        json!({"conversations": conv(&long, "A.")}).to_string(),                             // 9 too long
        json!({"video": "bad.mp4", "conversations": conv("<video>", "A.")}).to_string(),      // 10
        json!({"video": "good.mp4", "image": "ok2.jpg", "conversations": conv("<image><video>Q", "A.")}).to_string(), // 11 clean
    ];
    let path = dir.path().join("seeded.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();

    let checks = Checks {
        media: MediaCheck::Decode,
        video_check: Some(&video_check),
        token_length: Some(&token_length),
        max_length: Some(200),
    };
    let report = validate_dataset(&path, &DatasetOptions::default(), &checks);

    let got: Vec<(ProblemKind, Option<usize>, Option<usize>)> = report
        .problems
        .iter()
        .map(|p| (p.kind, p.location.line, p.location.index))
        .collect();
    use ProblemKind::*;
    let expected: Vec<(ProblemKind, Option<usize>, Option<usize>)> = [
        (Json, 2),
        (MissingMedia, 3),
        (BadImage, 4),
        (BadImage, 5),
        (PlaceholderMismatch, 6),
        (RoleOrder, 7),
        (EmptyTurn, 8),
        (TooLong, 9),
        (BadVideo, 10),
    ]
    .into_iter()
    .map(|(k, line)| (k, Some(line), Some(line - 1)))
    .collect();
    assert_eq!(got, expected, "{report}");
    for p in &report.problems {
        assert_eq!(p.location.file, path);
    }
    let msg = |i: usize| report.problems[i].message.clone();
    assert!(
        msg(1).contains("missing.png") && msg(1).contains("does not exist"),
        "{}",
        msg(1)
    );
    assert!(msg(2).contains("corrupt.png"), "{}", msg(2));
    assert!(msg(3).contains("notimage.jpg"), "{}", msg(3));
    assert!(
        msg(4).contains("2 image placeholder(s)") && msg(4).contains("1 image(s)"),
        "{}",
        msg(4)
    );
    assert!(
        msg(5).contains("turn 1 is from the assistant"),
        "{}",
        msg(5)
    );
    assert!(msg(6).contains("turn 2 (assistant) is empty"), "{}", msg(6));
    assert!(
        msg(7).contains("302 tokens") && msg(7).contains("max_length 200"),
        "{}",
        msg(7)
    );
    assert!(
        msg(8).contains("bad.mp4") && msg(8).contains("no decodable video stream"),
        "{}",
        msg(8)
    );

    assert_eq!(report.samples, 10);
    assert_eq!(report.unreadable, 1);
    assert_eq!(report.text_only, 3); // lines 7, 8, 9
    assert_eq!(report.with_images, 6); // lines 1, 3, 4, 5, 6, 11
    assert_eq!(report.with_videos, 2); // lines 10, 11
    assert_eq!(report.over_length, 1);
    // Lengths of the records without structural / media problems: lines 1, 9, 11.
    // 1: 100 + "What?" 5 + "A." 2 = 107; 9: 300 + 2 = 302; 11: 100 + 50 + 1 + 2 = 153.
    // Sorted 107 153 302: nearest rank p50 = 2nd, p90 = p99 = 3rd.
    assert_eq!(
        report.lengths,
        Some(LengthStats {
            count: 3,
            p50: 153,
            p90: 302,
            p99: 302,
            max: 302
        })
    );
    let shown = report.to_string();
    assert!(
        shown.contains("samples: 10 (3 text-only, 6 with images, 2 with videos)"),
        "{shown}"
    );
    assert!(shown.contains("9 problem(s)"), "{shown}");
    // The bad JSON line ends early: serde_json on the line alone places the error.
    let oracle = serde_json::from_str::<serde_json::Value>(&lines[1]).unwrap_err();
    assert_eq!(report.problems[0].location.column, Some(oracle.column()));
    assert!(
        shown.contains(&format!("{}:7 (record 6): role order:", path.display())),
        "{shown}"
    );
}

#[test]
fn a_record_with_image_and_video_counts_in_both() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    let rec =
        json!({"video": "v.mp4", "image": "i.png", "conversations": conv("<image><video>", "A")});
    std::fs::write(&path, format!("{rec}\n")).unwrap();
    let checks = Checks {
        media: MediaCheck::Skip,
        ..Default::default()
    };
    let r = validate_dataset(&path, &DatasetOptions::default(), &checks);
    assert_eq!(
        (r.samples, r.text_only, r.with_images, r.with_videos),
        (1, 0, 1, 1)
    );
}

#[test]
fn clean_dataset_summary_and_percentiles() {
    let dir = tempfile::tempdir().unwrap();
    write_images(dir.path());
    // Per-record lengths come from a table keyed by id, so the percentiles can be worked
    // out by hand: sorted 5 7 9 12 18 22 30 45 60 100.
    let lengths: HashMap<String, usize> = [12, 7, 30, 5, 100, 45, 18, 60, 22, 9]
        .iter()
        .enumerate()
        .map(|(i, n)| (i.to_string(), *n))
        .collect();
    let records = vec![
        json!({"id": 0, "conversations": conv("Hi", "Hello")}),
        json!({"id": 1, "image": "ok.png", "conversations": conv("<image>\nWhat?", "A cat.")}),
        json!({"id": 2, "image": ["ok.png", "ok2.jpg"], "conversations": conv("<image> vs <image>", "Same.")}),
        json!({"id": 3, "system_prompt": "Be brief.", "conversations": conv("Q", "A")}),
        json!({"id": 4, "video": "good.mp4", "conversations": conv("<video>\nWhat happens?", "Rain.")}),
        json!({"id": 5, "messages": [{"role": "user", "content": [{"type": "image", "image": "ok2.jpg"},
            {"type": "text", "text": "Colour?"}]}, {"role": "assistant", "content": "Red."}]}),
        json!({"id": 6, "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
            {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}),
        json!({"id": 7, "image": "ok.png", "video": "good.mp4", "conversations": conv("Describe both.", "Ok.")}),
        json!({"id": 8, "messages": [{"role": "user", "content": "Plain"}, {"role": "assistant", "content": "Yes"}]}),
        json!({"id": 9, "image": "ok.png", "conversations": conv("<image>", "Fine.")}),
    ];
    let path = dir.path().join("clean.json");
    std::fs::write(&path, serde_json::to_string_pretty(&records).unwrap()).unwrap();

    let table_length = |r: &Record| -> anyhow::Result<usize> {
        let id = r.id.as_deref().unwrap_or_default();
        lengths
            .get(id)
            .copied()
            .ok_or_else(|| anyhow::anyhow!("no length for id {id}"))
    };
    let checks = Checks {
        media: MediaCheck::Decode,
        video_check: Some(&video_check),
        token_length: Some(&table_length),
        max_length: Some(100),
    };
    let report = validate_dataset(&path, &DatasetOptions::default(), &checks);
    assert!(report.problems.is_empty(), "{report}");
    assert!(report.is_clean());
    let expected = ValidationReport {
        samples: 10,
        unreadable: 0,
        text_only: 4,   // ids 0, 3, 6, 8
        with_images: 5, // ids 1, 2, 5, 7, 9
        with_videos: 2, // ids 4, 7
        lengths: Some(LengthStats {
            count: 10,
            p50: 18,
            p90: 60,
            p99: 100,
            max: 100,
        }),
        max_length: Some(100),
        over_length: 0,
        problems: vec![],
    };
    assert_eq!(report, expected);
    assert!(
        report
            .to_string()
            .contains("p50 18, p90 60, p99 100, max 100"),
        "{report}"
    );

    // One token less of budget: only id 4 (length 100) is over.
    let tight = Checks {
        max_length: Some(99),
        ..checks
    };
    let report = validate_dataset(&path, &DatasetOptions::default(), &tight);
    assert_eq!(report.over_length, 1);
    assert_eq!(report.problems.len(), 1);
    assert_eq!(report.problems[0].kind, ProblemKind::TooLong);
    assert_eq!(report.problems[0].location.index, Some(4));
}

#[test]
fn nearest_rank_percentiles_by_hand() {
    // 1..=200: p50 = 100th value, p90 = 180th, p99 = 198th.
    let v: Vec<usize> = (1..=200).rev().collect();
    assert_eq!(
        LengthStats::from_lengths(&v),
        Some(LengthStats {
            count: 200,
            p50: 100,
            p90: 180,
            p99: 198,
            max: 200
        })
    );
    // One sample: every percentile is that sample.
    assert_eq!(
        LengthStats::from_lengths(&[42]),
        Some(LengthStats {
            count: 1,
            p50: 42,
            p90: 42,
            p99: 42,
            max: 42
        })
    );
    assert_eq!(LengthStats::from_lengths(&[]), None);
}

#[test]
fn per_record_check_follows_on_bad_sample() {
    let dir = tempfile::tempdir().unwrap();
    write_images(dir.path());
    let path = dir.path().join("d.jsonl");
    let good = json!({"image": "ok.png", "conversations": conv("<image>Q", "A")});
    let bad = json!({"image": "corrupt.png", "conversations": [{"from": "human", "value": "Q"}]});
    std::fs::write(&path, format!("{good}\n{bad}\n")).unwrap();
    let ds = Dataset::open(&path, DatasetOptions::default()).unwrap();
    let recs: Vec<Record> = ds.records().unwrap().map(|r| r.unwrap()).collect();
    let checks = Checks {
        token_length: Some(&token_length),
        ..Default::default()
    };

    assert_eq!(check_record(&recs[0], &checks), Ok(Some(100 + 1 + 1)));
    let first = check_record(&recs[1], &checks).unwrap_err();
    // Structure is checked before media: the missing assistant reply comes first.
    let all = record_problems(&recs[1], &checks);
    let kinds: Vec<_> = all.problems.iter().map(|p| p.kind).collect();
    assert_eq!(kinds, vec![ProblemKind::RoleOrder, ProblemKind::BadImage]);
    assert_eq!(all.length, None);
    assert_eq!(first, all.problems[0]);
    assert_eq!(first.location.line, Some(2));

    assert_eq!(
        screen_record(recs[0].clone(), &checks, OnBadSample::Error),
        Ok(Some(recs[0].clone()))
    );
    assert_eq!(
        screen_record(recs[1].clone(), &checks, OnBadSample::Skip),
        Ok(None)
    );
    assert_eq!(
        screen_record(recs[1].clone(), &checks, OnBadSample::Error),
        Err(first)
    );
}

#[test]
fn unreadable_file_is_one_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.json");
    let text = "[\n {\"conversations\": [\n";
    std::fs::write(&path, text).unwrap();
    let oracle = serde_json::from_str::<serde_json::Value>(text).unwrap_err();
    let report = validate_dataset(&path, &DatasetOptions::default(), &Checks::default());
    assert_eq!(report.samples, 0);
    assert_eq!(report.problems.len(), 1);
    let p = &report.problems[0];
    assert_eq!(p.kind, ProblemKind::Json);
    assert_eq!(
        (p.location.line, p.location.column),
        (Some(oracle.line()), Some(oracle.column()))
    );
    assert_eq!(p.location.index, None);

    let missing = validate_dataset(
        &dir.path().join("none.jsonl"),
        &DatasetOptions::default(),
        &Checks::default(),
    );
    assert_eq!(missing.problems[0].kind, ProblemKind::Io);
    assert!(missing.to_string().contains("none.jsonl"), "{missing}");
}
