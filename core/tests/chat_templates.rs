//! Chat templates against `transformers` (scripts/oracle/chat_templates.py): rendering,
//! token ids, label masks, generation prompts, media expansion and errors.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use lmms_ft_core::data::template::{
    discover_template, load_dir_tokenizer, load_tokenizer, tokenizer_path, ChatRenderer,
    ContentMode, HfChatTemplate, MediaPlaceholders, SpecialTokens, TemplateSource,
};
use lmms_ft_core::data::{Conversation, Part, Role, Turn};
use lmms_ft_core::family::{ChatTemplate, MediaTokens, IGNORE_INDEX};
use proptest::prelude::*;
use serde_json::{json, Value};

const QWEN3B: &str = "Qwen--Qwen2.5-VL-3B-Instruct";
const QWEN7B: &str = "Qwen--Qwen2.5-VL-7B-Instruct";
const LLAVA15: &str = "llava-hf--llava-1.5-7b-hf";
const MISTRAL: &str = "llava-hf--llava-v1.6-mistral-7b-hf";
const INTER05: &str = "llava-hf--llava-interleave-qwen-0.5b-hf";
const INTER7: &str = "llava-hf--llava-interleave-qwen-7b-hf";

/// llava-1.5's Vicuna training format: the Hub template writes no `</s>` after answers.
const VICUNA: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}{% elif message['role'] == 'user' %}{{ 'USER: ' }}{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ ' ' }}{% else %}{{ 'ASSISTANT: ' + message['content'][0]['text'] + '</s>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

/// Whitespace control around `{% generation %}` and HF's `tojson` (non-ASCII, `<`, indent).
const GEN_WS: &str = "{% for m in messages %}\n  {%- if m['role'] == 'assistant' %}\n    {%- generation -%}\n      [{{ m['content'][0]['text'] }}]\n    {%- endgeneration %}\n  {% else %}\n{{ m['role'] }}: {{ m['content'] | tojson }}\n  {% endif %}\n{% endfor %}{{ messages[0] | tojson(indent=2) }}|{{ {'b': [1, 2.5, none, true], 'a': '<é>'} | tojson(separators=(',', ':')) }}";

fn hf(name: &str) -> PathBuf {
    lmms_ft_core::testing::hf_configs().join(name)
}

fn text(t: &str) -> Part {
    Part::Text { text: t.into() }
}
fn image(index: usize) -> Part {
    Part::Image { index }
}
fn turn(role: Role, parts: Vec<Part>) -> Turn {
    Turn { role, parts }
}

/// System prompt, three user/assistant rounds with images (interleaved in the second user
/// turn) and, when `video`, a video in the third.
fn conversation(video: bool) -> Conversation {
    let third = if video {
        vec![Part::Video { index: 0 }, text("What happens in the clip?")]
    } else {
        vec![text("Describe the colours.")]
    };
    Conversation {
        turns: vec![
            Turn::text(Role::System, "You are a careful visual assistant."),
            turn(Role::User, vec![image(0), text("What is in this picture?")]),
            Turn::text(Role::Assistant, "A red bicycle leaning on a wall."),
            turn(
                Role::User,
                vec![text("And here?"), image(1), text("Compare them, please.")],
            ),
            Turn::text(
                Role::Assistant,
                "The second one is blue; both are bikes.\nThat's all.",
            ),
            turn(Role::User, third),
            Turn::text(Role::Assistant, "Someone rides away, très vite (99 km/h)!"),
        ],
    }
}

struct Case {
    name: &'static str,
    dir: &'static str,
    /// Explicit template instead of the directory's.
    template: Option<&'static str>,
    /// Folder whose tokenizer to use (a stand-in where the template's own is not offline).
    tokenizer: Option<&'static str>,
    conv: Conversation,
    media: MediaTokens,
    image: Option<&'static str>,
    video: Option<&'static str>,
    string_content: Option<(&'static str, &'static str)>,
    /// Whether transformers itself renders it (every real template here does).
    transformers_renders: bool,
}

fn case(name: &'static str, dir: &'static str, tokenizer: Option<&'static str>) -> Case {
    let qwen_vl = dir.starts_with("Qwen");
    let video = qwen_vl;
    let media = MediaTokens {
        images: vec![4, 3],
        videos: if video { vec![5] } else { vec![] },
    };
    let (image, video_tok) = if qwen_vl {
        (Some("<|image_pad|>"), Some("<|video_pad|>"))
    } else {
        (Some("<image>"), None)
    };
    Case {
        name,
        dir,
        template: None,
        tokenizer,
        conv: conversation(video),
        media,
        image,
        video: video_tok,
        string_content: None,
        transformers_renders: true,
    }
}

fn cases() -> Vec<Case> {
    let mut v = vec![
        case("qwen25vl_3b", QWEN3B, Some(QWEN3B)),
        case("qwen25vl_7b", QWEN7B, Some(QWEN7B)),
        case("llava15_hub", LLAVA15, Some(LLAVA15)),
        Case {
            template: Some(VICUNA),
            ..case("llava15_vicuna_training", LLAVA15, Some(LLAVA15))
        },
        // No Mistral tokenizer is available offline: the llava-1.5 (Llama) tokenizer stands
        // in, which still checks rendering, `</s>` end-of-turn labels and media expansion.
        case("llava16_mistral", MISTRAL, Some(LLAVA15)),
        // Only the template of the 0.5B is available; the 7B's tokenizer is the same
        // Qwen1.5 vocabulary with `<image>` added.
        case("interleave_05b", INTER05, Some(INTER7)),
        case("interleave_7b", INTER7, Some(INTER7)),
        Case {
            template: Some(GEN_WS),
            ..case("generation_ws_tojson", QWEN3B, None)
        },
    ];
    // The tokenizer's own text-only ChatML template, fed string content with inline `<image>`.
    let chatml = serde_json::from_str::<Value>(
        &std::fs::read_to_string(hf(INTER7).join("tokenizer_config.json")).expect("read"),
    )
    .expect("parse")["chat_template"]
        .as_str()
        .expect("chat_template string")
        .to_string();
    v.push(Case {
        template: Some(Box::leak(chatml.into_boxed_str())),
        string_content: Some(("<image>\n", "<video>\n")),
        ..case(
            "interleave_7b_tokenizer_chatml_string",
            INTER7,
            Some(INTER7),
        )
    });
    v
}

struct Oracle {
    _dir: tempfile::TempDir,
    tokenizers: BTreeMap<String, PathBuf>,
    cases: Value,
}

fn oracle() -> &'static Oracle {
    static ORACLE: OnceLock<Oracle> = OnceLock::new();
    ORACLE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut toks = serde_json::Map::new();
        for c in cases() {
            if let Some(t) = c.tokenizer {
                toks.insert(t.to_string(), json!(hf(t)));
            }
        }
        let input = json!({
            "out_dir": dir.path(),
            "tokenizers": toks,
            "cases": cases().iter().map(|c| json!({
                "name": c.name,
                "template_dir": hf(c.dir),
                "template": c.template,
                "tokenizer": c.tokenizer,
                "turns": c.conv.turns,
                "images": c.media.images,
                "videos": c.media.videos,
                "image_token": c.image,
                "video_token": c.video,
                "string_content": c.string_content.map(|(i, v)| json!({"image": i, "video": v})),
            })).collect::<Vec<_>>(),
        });
        let in_path = dir.path().join("in.json");
        let out_path = dir.path().join("out.json");
        std::fs::write(&in_path, input.to_string()).expect("write oracle input");
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/oracle/chat_templates.py");
        let out = Command::new(lmms_ft_core::testing::oracle_python())
            .arg(&script)
            .arg(&in_path)
            .arg(&out_path)
            .output()
            .expect("running the oracle (run scripts/setup.sh if Python is missing)");
        assert!(
            out.status.success(),
            "oracle failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result: Value =
            serde_json::from_str(&std::fs::read_to_string(&out_path).expect("oracle output"))
                .expect("oracle JSON");
        let tokenizers = result["tokenizers"]
            .as_object()
            .expect("tokenizers")
            .iter()
            .map(|(k, v)| (k.clone(), PathBuf::from(v.as_str().expect("path"))))
            .collect();
        Oracle {
            _dir: dir,
            tokenizers,
            cases: result["cases"].clone(),
        }
    })
}

fn content_mode(c: &Case) -> ContentMode {
    match c.string_content {
        Some((image, video)) => ContentMode::String {
            image: image.into(),
            video: video.into(),
        },
        None => ContentMode::Parts,
    }
}

fn renderer(c: &Case) -> ChatRenderer {
    let source = match c.template {
        Some(t) => TemplateSource {
            source: t.into(),
            origin: c.name.into(),
        },
        None => discover_template(&hf(c.dir)).expect("discover"),
    };
    let special =
        SpecialTokens::from_dir(&hf(c.tokenizer.unwrap_or(c.dir))).expect("special tokens");
    ChatRenderer::new(source, special, content_mode(c)).expect("compile")
}

fn template(c: &Case) -> HfChatTemplate {
    let folder = c.tokenizer.expect("case with tokenizer");
    let tok = if hf(folder).join("tokenizer.json").is_file() {
        load_dir_tokenizer(&hf(folder)).expect("tokenizer")
    } else {
        load_tokenizer(&oracle().tokenizers[folder]).expect("tokenizer")
    };
    let media = MediaPlaceholders {
        image: c.image.map(String::from),
        video: c.video.map(String::from),
    };
    HfChatTemplate::new(renderer(c), tok, media).expect("template")
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("int"))
        .collect()
}

fn prompt_conv(conv: &Conversation) -> Conversation {
    let mut p = conv.clone();
    p.turns.pop();
    p
}

#[test]
fn renders_like_transformers() {
    for c in cases() {
        let expected = &oracle().cases[c.name];
        if !c.transformers_renders {
            assert!(
                expected.get("error").is_some(),
                "{}: transformers was expected to fail",
                c.name
            );
            continue;
        }
        assert!(
            expected.get("error").is_none(),
            "{}: transformers failed: {}",
            c.name,
            expected["error"]
        );
        let r = renderer(&c);
        let got = r.render(&c.conv, false).expect("render");
        assert_eq!(
            got,
            expected["rendered"].as_str().expect("str"),
            "{} full",
            c.name
        );
        let got = r
            .render(&prompt_conv(&c.conv), true)
            .expect("render prompt");
        assert_eq!(
            got,
            expected["prompt_rendered"].as_str().expect("str"),
            "{} prompt",
            c.name
        );
    }
}

#[test]
fn ids_labels_and_prompts_match_transformers() {
    for c in cases().into_iter().filter(|c| c.tokenizer.is_some()) {
        let expected = &oracle().cases[c.name];
        let t = template(&c);
        let enc = t.encode(&c.conv, &c.media, false).expect("encode");
        assert_eq!(enc.input_ids, ints(&expected["ids"]), "{} ids", c.name);
        // transformers' whole-string tokenisation is the same, except where the interleave
        // templates write `\n` + answer after a generation prompt ending in `\n`: the pair
        // merges into one `\n\n` token there, so the ids are transformers' tokenisation of
        // the prompt and of the rest, which keeps the prompt a prefix (see template.rs).
        let whole = ints(&expected["whole_ids"]);
        if matches!(c.name, "interleave_05b" | "interleave_7b") {
            assert_ne!(
                enc.input_ids, whole,
                "{}: expected a split at the prompt end",
                c.name
            );
            assert_eq!(
                enc.input_ids.len(),
                whole.len() + 3,
                "{}: one extra token per answer",
                c.name
            );
        } else {
            assert_eq!(
                enc.input_ids, whole,
                "{}: differs from whole-string tokenisation",
                c.name
            );
        }
        let want = ints(&expected["labels"]);
        assert_eq!(enc.labels.len(), want.len(), "{} label count", c.name);
        for (i, (g, w)) in enc.labels.iter().zip(&want).enumerate() {
            assert_eq!(
                g, w,
                "{}: label {i} (token {}) differs",
                c.name, enc.input_ids[i]
            );
        }
        let n_labeled = want.iter().filter(|&&l| l != IGNORE_INDEX).count();
        assert!(
            n_labeled > 0 && n_labeled < want.len() / 2,
            "{}: {n_labeled} labels",
            c.name
        );

        let all = t.encode(&c.conv, &c.media, true).expect("encode label_all");
        assert_eq!(
            all.input_ids, enc.input_ids,
            "{}: label_all changes ids",
            c.name
        );
        assert_eq!(
            all.labels,
            ints(&expected["labels_all"]),
            "{} label_all",
            c.name
        );

        let prompt = t.encode_prompt(&c.conv, &c.media).expect("encode_prompt");
        assert_eq!(
            prompt,
            ints(&expected["prompt_ids"]),
            "{} prompt ids",
            c.name
        );
        assert!(
            enc.input_ids.starts_with(&prompt) && prompt.len() < enc.input_ids.len(),
            "{}: prompt ids are not a prefix of the training ids",
            c.name
        );
    }
}

#[test]
fn qwen_labels_decode_to_answers() {
    let c = cases()
        .into_iter()
        .find(|c| c.name == "qwen25vl_3b")
        .expect("case");
    let t = template(&c);
    let enc = t.encode(&c.conv, &c.media, false).expect("encode");
    let labeled: Vec<u32> = enc
        .labels
        .iter()
        .filter(|&&l| l >= 0)
        .map(|&l| l as u32)
        .collect();
    let got = t.tokenizer().decode(&labeled, false).expect("decode");
    assert_eq!(
        got,
        "A red bicycle leaning on a wall.<|im_end|>The second one is blue; both are bikes.\nThat's all.<|im_end|>Someone rides away, très vite (99 km/h)!<|im_end|>"
    );
    let n_image = enc.input_ids.iter().filter(|&&i| i == 151655).count();
    assert_eq!(n_image, 4 + 3);
}

#[test]
fn discovery_order_and_special_tokens() {
    let d = tempfile::tempdir().expect("tempdir");
    let w = |f: &str, s: &str| std::fs::write(d.path().join(f), s).expect("write");
    w(
        "tokenizer_config.json",
        r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
            "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>", "unk_token": null,
            "add_bos_token": true, "extra_special_tokens": {"image_token": "<image>"}}"#,
    );
    assert_eq!(discover_template(d.path()).expect("config").source, "D");
    w("chat_template.json", r#"{"chat_template": "J"}"#);
    assert_eq!(discover_template(d.path()).expect("json").source, "J");
    w("chat_template.jinja", "K");
    assert_eq!(discover_template(d.path()).expect("jinja").source, "K");
    let s = SpecialTokens::from_dir(d.path()).expect("special");
    assert_eq!(s.get("bos_token"), Some("<s>"));
    assert_eq!(s.get("eos_token"), Some("</s>"));
    assert_eq!(s.get("image_token"), Some("<image>"));
    assert_eq!(s.get("unk_token"), None);
    assert_eq!(s.get("add_bos_token"), None);

    let e = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        e.path().join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "x", "template": "X"}]}"#,
    )
    .expect("write");
    let err = format!("{:#}", discover_template(e.path()).expect_err("no default"));
    assert!(
        err.contains("no \"default\" entry") && err.contains('x'),
        "{err}"
    );

    // The real interleave-7b folder has a text-only ChatML template in tokenizer_config.json;
    // chat_template.json must win.
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(hf(INTER7).join("chat_template.json")).expect("read"),
    )
    .expect("parse");
    assert_eq!(
        discover_template(&hf(INTER7)).expect("discover").source,
        want["chat_template"]
    );
    let err = format!(
        "{:#}",
        tokenizer_path(&hf(QWEN3B)).expect_err("no tokenizer.json")
    );
    assert!(err.contains("vocab.json, merges.txt"), "{err}");
}

#[test]
fn raise_exception_carries_message() {
    let src = TemplateSource {
        source: "{% if messages[0]['role'] == 'user' %}{{ raise_exception('Conversations must start with a system turn, got ' + messages[0]['role']) }}{% endif %}".into(),
        origin: "test".into(),
    };
    let r = ChatRenderer::new(src, SpecialTokens::default(), ContentMode::Parts).expect("compile");
    let conv = Conversation {
        turns: vec![Turn::text(Role::User, "hi")],
    };
    let err = format!("{:#}", r.render(&conv, false).expect_err("must fail"));
    assert!(
        err.contains("Conversations must start with a system turn, got user"),
        "{err}"
    );
}

#[test]
fn media_count_mismatch_is_an_error() {
    let c = cases()
        .into_iter()
        .find(|c| c.name == "qwen25vl_3b")
        .expect("case");
    let t = template(&c);
    let fewer = MediaTokens {
        images: vec![4],
        videos: vec![5],
    };
    let err = format!(
        "{:#}",
        t.encode(&c.conv, &fewer, false).expect_err("mismatch")
    );
    assert!(
        err.contains("2 image placeholder(s) <|image_pad|> but 1 image(s)"),
        "{err}"
    );
    let no_video = MediaTokens {
        images: vec![4, 3],
        videos: vec![],
    };
    let err = format!(
        "{:#}",
        t.encode(&c.conv, &no_video, false).expect_err("mismatch")
    );
    assert!(
        err.contains("1 video placeholder(s) <|video_pad|> but 0 video(s)"),
        "{err}"
    );
}

fn qwen() -> &'static HfChatTemplate {
    static T: OnceLock<HfChatTemplate> = OnceLock::new();
    T.get_or_init(|| {
        template(
            &cases()
                .into_iter()
                .find(|c| c.name == "qwen25vl_3b")
                .expect("case"),
        )
    })
}

fn texts() -> impl Strategy<Value = String> {
    let alphabet: Vec<char> = "abcxyzABQ 019 .,;:!?'\"-()\n\téßñüжλ中".chars().collect();
    proptest::collection::vec(proptest::sample::select(alphabet), 1..24)
        .prop_map(|cs| cs.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Exactly the assistant contents and their `<|im_end|>` are labeled, whatever the text.
    #[test]
    fn qwen_labels_are_exactly_the_answers(
        system in proptest::option::of(texts()),
        pairs in proptest::collection::vec((texts(), proptest::option::of(1usize..5), texts()), 1..5),
    ) {
        let mut turns = Vec::new();
        if let Some(s) = system {
            turns.push(Turn::text(Role::System, s));
        }
        let mut media = MediaTokens::default();
        let mut want = String::new();
        for (user, img, answer) in &pairs {
            let mut parts = vec![text(user)];
            if let Some(k) = img {
                parts.insert(0, image(media.images.len()));
                media.images.push(*k);
            }
            turns.push(turn(Role::User, parts));
            turns.push(Turn::text(Role::Assistant, answer.clone()));
            want.push_str(answer);
            want.push_str("<|im_end|>");
        }
        let conv = Conversation { turns };
        let t = qwen();
        let enc = t.encode(&conv, &media, false).expect("encode");
        let labeled: Vec<u32> = enc.labels.iter().zip(&enc.input_ids)
            .filter(|(l, _)| **l != IGNORE_INDEX)
            .map(|(l, i)| { assert_eq!(l, i); *l as u32 })
            .collect();
        prop_assert_eq!(t.tokenizer().decode(&labeled, false).expect("decode"), want);
        let prompt = t.encode_prompt(&conv, &media).expect("prompt");
        prop_assert!(enc.input_ids.starts_with(&prompt));
    }
}
