//! `lmms-ft chat` driven through stdin on the tiny LLaVA-1.5 fixture
//! (`scripts/oracle/llava_fixture.py`, whose greedy generation equals transformers', see
//! `adapters/llava/tests/generation.rs`): two turns with an image give the tokens `generate`
//! gives for the same conversation (the first turn through the `generate` command, the
//! second, which carries the first reply, through the library's `Pipeline::generate`);
//! `/reset` starts a conversation without the image; streamed output is the JSON replies'
//! text; a bad command or image path is reported and the session goes on.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use lmms_ft_core::data::media::{load_image, ImageLimits};
use lmms_ft_core::data::{Conversation, DecodedMedia, Part, Role, Turn};
use lmms_ft_core::family::{DynFamily, Erased, OpenOptions, PreparedConversation};
use lmms_ft_core::generate::GenerateOptions;
use lmms_ft_core::testing::cached_fixture;
use lmms_ft_llava::family::Llava;
use tch::{Device, Kind};

mod support;
use support::{assert_ok, lmms_ft};

const MAX_NEW: usize = 6;

/// Runs `chat` with `args`, feeding `input` on stdin; returns stdout and stderr.
fn chat(dir: &Path, args: &[&str], input: &str) -> (String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lmms-ft"))
        .args(["chat", "--model-path", dir.to_str().unwrap()])
        .args(["--max-new-tokens", &MAX_NEW.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_ok(&out);
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn generate_cli(dir: &Path, image: Option<&Path>, prompt: &str) -> serde_json::Value {
    let mut args = vec![
        "generate".to_string(),
        "--model-path".into(),
        dir.to_str().unwrap().into(),
        "--prompt".into(),
        prompt.into(),
        "--max-new-tokens".into(),
        MAX_NEW.to_string(),
        "--json".into(),
    ];
    if let Some(image) = image {
        args.extend(["--image".into(), image.to_str().unwrap().into()]);
    }
    let out = lmms_ft(&args);
    assert_ok(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn chat_on_a_pipe_equals_generate() {
    let (dir, _) = cached_fixture("llava_fixture.py", "llava");
    let image = dir.join("image_b.png");
    let input = format!(
        "/image {}\nDescribe it.\nAnd the colours?\n/reset\nDescribe it.\n/exit\nnot read\n",
        image.display()
    );
    let (stdout, _) = chat(&dir, &["--json"], &input);
    let replies: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(replies.len(), 3, "{stdout}");

    // Turn 1: one user turn with the image, as `generate --image --prompt` makes it.
    let first = generate_cli(&dir, Some(&image), "Describe it.");
    assert_eq!(replies[0]["token_ids"], first["token_ids"], "turn 1");
    assert_eq!(replies[0]["text"], first["text"], "turn 1");
    let tokens = replies[0]["token_ids"].as_array().unwrap().len();
    assert!(tokens > 0, "turn 1 generated nothing");

    // Turn 2: the conversation with the first reply, through the library.
    let family: &dyn DynFamily = &Erased::<Llava>::NEW;
    let pipeline = family
        .open(
            &dir,
            OpenOptions {
                device: Device::Cpu,
                kind: Kind::Float,
                processor: Default::default(),
            },
            None,
        )
        .unwrap();
    let conversation = Conversation {
        turns: vec![
            Turn {
                role: Role::User,
                parts: vec![
                    Part::Image { index: 0 },
                    Part::Text {
                        text: "Describe it.".into(),
                    },
                ],
            },
            Turn::text(Role::Assistant, replies[0]["text"].as_str().unwrap()),
            Turn::text(Role::User, "And the colours?"),
        ],
    };
    let media = DecodedMedia {
        images: vec![load_image(&image, &ImageLimits::default()).unwrap()],
        ..Default::default()
    };
    let opts = GenerateOptions {
        max_new_tokens: MAX_NEW,
        ..Default::default()
    };
    let second = pipeline
        .generate(
            &PreparedConversation {
                conversation,
                media,
            },
            &opts,
        )
        .unwrap();
    let ids: Vec<i64> = replies[1]["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(ids, second.token_ids, "turn 2");
    assert_eq!(replies[1]["stopped"], second.stopped, "turn 2");

    // After /reset: no image, a fresh conversation.
    let fresh = generate_cli(&dir, None, "Describe it.");
    assert_eq!(replies[2]["token_ids"], fresh["token_ids"], "after /reset");
    assert_ne!(
        replies[2]["token_ids"], replies[0]["token_ids"],
        "the image must change the reply, or the reset check shows nothing"
    );

    // Streaming prints the same replies, one per line.
    let (streamed, _) = chat(&dir, &[], &input);
    let expected: String = replies
        .iter()
        .map(|r| format!("{}\n", r["text"].as_str().unwrap()))
        .collect();
    assert_eq!(streamed, expected);
}

#[test]
fn chat_reports_bad_commands_and_goes_on() {
    let (dir, _) = cached_fixture("llava_fixture.py", "llava");
    let (stdout, stderr) = chat(
        &dir,
        &["--json"],
        "/image /no/such/picture.png\n/frobnicate\nWhat is 2+2?\n",
    );
    assert!(stderr.contains("picture.png"), "{stderr}");
    assert!(stderr.contains("unknown command `/frobnicate`"), "{stderr}");
    let replies: Vec<&str> = stdout.lines().collect();
    assert_eq!(replies.len(), 1, "{stdout}");
    let fresh = generate_cli(&dir, None, "What is 2+2?");
    let reply: serde_json::Value = serde_json::from_str(replies[0]).unwrap();
    assert_eq!(reply["token_ids"], fresh["token_ids"]);
}
