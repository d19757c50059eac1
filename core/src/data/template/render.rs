//! Rendering chat templates with minijinja the way `transformers` renders them with Jinja2,
//! and locating the assistant contents in the rendered text.

use std::fmt::Write as _;
use std::ops::Range;

use anyhow::{anyhow, bail, Result};
use minijinja::value::{Kwargs, Rest};
use minijinja::{Environment, Error, ErrorKind, Value};

use super::discovery::{SpecialTokens, TemplateSource};
use crate::data::{Conversation, Part, Role};

const TEMPLATE_NAME: &str = "chat_template";

/// How a turn's parts reach the template as `message.content`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ContentMode {
    /// `[{"type": "text", "text": ...}, {"type": "image"}, {"type": "video"}]` in part order:
    /// what current Hub templates of multimodal models expect.
    #[default]
    Parts,
    /// One string per turn: text parts concatenated, with `image` / `video` written where the
    /// media parts are. For templates written for text-only LLMs (e.g. a tokenizer's own
    /// ChatML template) that expect the family's placeholder inline.
    String { image: String, video: String },
}

/// A compiled chat template plus the variables `transformers` passes to it.
pub struct ChatRenderer {
    env: Environment<'static>,
    origin: String,
    special: SpecialTokens,
    content_mode: ContentMode,
}

impl std::fmt::Debug for ChatRenderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatRenderer")
            .field("origin", &self.origin)
            .field("content_mode", &self.content_mode)
            .finish_non_exhaustive()
    }
}

/// Byte ranges of the assistant contents in a rendering, grouped per assistant turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssistantSpans {
    pub text: String,
    /// One entry per assistant turn, one range per text part of that turn, in order.
    pub turns: Vec<Vec<Range<usize>>>,
}

impl ChatRenderer {
    /// Compiles `template` with `transformers`' Jinja settings (`trim_blocks`,
    /// `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a `tojson` that
    /// behaves like Python's `json.dumps`, Python string / dict methods).
    pub fn new(
        template: TemplateSource,
        special: SpecialTokens,
        content_mode: ContentMode,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        // Jinja2's lexer turns every `\r\n` / `\r` into `\n`, in text and in string
        // literals alike (and Python reads `.jinja` files with universal newlines): the
        // llava-1.5 `chat_template.jinja` on the Hub has CRLF inside `'<image>\n'`.
        let source =
            strip_generation_tags(&template.source.replace("\r\n", "\n").replace('\r', "\n"));
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| anyhow!("compiling chat template from {}: {e:#}", template.origin))?;
        Ok(Self {
            env,
            origin: template.origin,
            special,
            content_mode,
        })
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders `conv` as `apply_chat_template(..., tokenize=False)` would.
    pub fn render(&self, conv: &Conversation, add_generation_prompt: bool) -> Result<String> {
        self.render_messages(self.messages(conv, None), add_generation_prompt)
    }

    /// Renders `conv` and finds where each assistant text part landed. The conversation is
    /// rendered a second time with a unique sentinel in place of each assistant text; if
    /// putting the contents back in place of the sentinels reproduces the real rendering the
    /// positions are exact. Templates that transform the content (`| trim`, ...) fail that
    /// check and fall back to searching each trimmed content in order in the real text.
    pub fn assistant_spans(
        &self,
        conv: &Conversation,
        add_generation_prompt: bool,
    ) -> Result<AssistantSpans> {
        let text = self.render(conv, add_generation_prompt)?;
        let contents = assistant_texts(conv);
        let sentinels: Vec<String> = (0..contents.len())
            .map(|k| format!("\u{E000}lmms{k}\u{E001}"))
            .collect();
        let marked =
            self.render_messages(self.messages(conv, Some(&sentinels)), add_generation_prompt)?;
        let flat = match locate_sentinels(&marked, &sentinels, &contents, &text) {
            Some(spans) => spans,
            None => search_contents(&text, &contents)
                .map_err(|e| anyhow!("chat template from {}: {e}", self.origin))?,
        };
        let mut turns: Vec<Vec<Range<usize>>> = Vec::new();
        let mut last_turn = None;
        for ((turn, _), span) in contents.iter().zip(flat) {
            if last_turn != Some(*turn) {
                turns.push(Vec::new());
                last_turn = Some(*turn);
            }
            if let (Some(current), Some(span)) = (turns.last_mut(), span) {
                current.push(span);
            }
        }
        Ok(AssistantSpans { text, turns })
    }

    fn render_messages(&self, messages: Vec<Value>, add_generation_prompt: bool) -> Result<String> {
        let mut ctx: Vec<(String, Value)> = Vec::new();
        for (name, text) in &self.special.tokens {
            ctx.push((name.clone(), Value::from(text.as_str())));
        }
        ctx.push(("messages".into(), Value::from(messages)));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        ctx.push(("tools".into(), Value::from(())));
        let ctx: Value = ctx.into_iter().collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow!("chat template from {}: {e:#}", self.origin))?;
        template
            .render(ctx)
            .map_err(|e| anyhow!("rendering chat template from {}: {e:#}", self.origin))
    }

    /// The template's `messages`; `sentinels` replaces the assistant texts (in order). Built
    /// as minijinja maps so keys keep Python's insertion order (`tojson` shows it).
    fn messages(&self, conv: &Conversation, sentinels: Option<&[String]>) -> Vec<Value> {
        let mut k = 0;
        let map = |pairs: Vec<(&str, Value)>| -> Value { pairs.into_iter().collect() };
        conv.turns
            .iter()
            .map(|turn| {
                let mut text_of = |text: &str| -> String {
                    match (turn.role, sentinels) {
                        (Role::Assistant, Some(s)) => {
                            let out = s.get(k).cloned().unwrap_or_default();
                            k += 1;
                            out
                        }
                        _ => text.to_string(),
                    }
                };
                let content = match &self.content_mode {
                    ContentMode::Parts => turn
                        .parts
                        .iter()
                        .map(|p| match p {
                            Part::Text { text } => map(vec![
                                ("type", Value::from("text")),
                                ("text", Value::from(text_of(text))),
                            ]),
                            Part::Image { .. } => map(vec![("type", Value::from("image"))]),
                            Part::Video { .. } => map(vec![("type", Value::from("video"))]),
                        })
                        .collect::<Value>(),
                    ContentMode::String { image, video } => {
                        let mut s = String::new();
                        for p in &turn.parts {
                            match p {
                                Part::Text { text } => s.push_str(&text_of(text)),
                                Part::Image { .. } => s.push_str(image),
                                Part::Video { .. } => s.push_str(video),
                            }
                        }
                        Value::from(s)
                    }
                };
                map(vec![
                    ("role", Value::from(turn.role.as_str())),
                    ("content", content),
                ])
            })
            .collect()
    }
}

/// `(turn index, text)` of every assistant text part, in order.
fn assistant_texts(conv: &Conversation) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    for (i, turn) in conv.turns.iter().enumerate() {
        if turn.role != Role::Assistant {
            continue;
        }
        for part in &turn.parts {
            if let Part::Text { text } = part {
                out.push((i, text.as_str()));
            }
        }
    }
    out
}

/// Maps sentinel positions in `marked` to content positions in `real`; `None` unless each
/// sentinel occurs exactly once, in order, and substituting the contents gives `real`.
fn locate_sentinels(
    marked: &str,
    sentinels: &[String],
    contents: &[(usize, &str)],
    real: &str,
) -> Option<Vec<Option<Range<usize>>>> {
    let mut rebuilt = String::with_capacity(real.len());
    let mut spans = Vec::with_capacity(sentinels.len());
    let mut cursor = 0;
    for (sentinel, (_, content)) in sentinels.iter().zip(contents) {
        let at = cursor + marked[cursor..].find(sentinel.as_str())?;
        rebuilt.push_str(&marked[cursor..at]);
        let start = rebuilt.len();
        rebuilt.push_str(content);
        spans.push(Some(start..rebuilt.len()));
        cursor = at + sentinel.len();
        if marked[cursor..].contains(sentinel.as_str()) {
            return None;
        }
    }
    rebuilt.push_str(&marked[cursor..]);
    (rebuilt == real).then_some(spans)
}

/// Fallback: each trimmed content, searched in order. Empty contents get no span.
fn search_contents(real: &str, contents: &[(usize, &str)]) -> Result<Vec<Option<Range<usize>>>> {
    let mut cursor = 0;
    let mut spans = Vec::with_capacity(contents.len());
    for (n, (turn, content)) in contents.iter().enumerate() {
        let needle = content.trim();
        if needle.is_empty() {
            spans.push(None);
            continue;
        }
        let Some(found) = real[cursor..].find(needle) else {
            bail!(
                "assistant text #{n} (turn {turn}) does not appear in the rendered \
                 conversation; the template changes assistant contents beyond trimming, so \
                 labels cannot be placed"
            );
        };
        let start = cursor + found;
        spans.push(Some(start..start + needle.len()));
        cursor = start + needle.len();
    }
    Ok(spans)
}

/// Replaces `{% generation %}` / `{% endgeneration %}` (a Jinja extension of
/// `transformers`' that minijinja lacks) by an always-true `if` block, keeping the tag's
/// whitespace-control markers so `trim_blocks` / `lstrip_blocks` act on it exactly as Jinja2
/// acts on the real tag.
pub fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        out.push_str(&rest[..open]);
        let tag = &rest[open..];
        match parse_generation_tag(tag) {
            Some((len, left, end, right)) => {
                let body = if end { "endif" } else { "if true" };
                let _ = write!(out, "{{%{left} {body} {right}%}}");
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Parses `{%[-+]? (end)?generation [-+]?%}` at the start of `s`: (length, left marker,
/// is end tag, right marker).
fn parse_generation_tag(s: &str) -> Option<(usize, &str, bool, &str)> {
    let mut i = 2;
    let b = s.as_bytes();
    let left = match b.get(i) {
        Some(b'-') | Some(b'+') => {
            i += 1;
            &s[i - 1..i]
        }
        _ => "",
    };
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    let (end, word) = if s[i..].starts_with("endgeneration") {
        (true, "endgeneration")
    } else if s[i..].starts_with("generation") {
        (false, "generation")
    } else {
        return None;
    };
    i += word.len();
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    let right = match b.get(i) {
        Some(b'-') | Some(b'+') => {
            i += 1;
            &s[i - 1..i]
        }
        _ => "",
    };
    s[i..]
        .starts_with("%}")
        .then_some((i + 2, left, end, right))
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> Result<String, Error> {
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        )
    })?;
    Ok(out)
}

/// `transformers`' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, positional arguments in that order. Jinja's own
/// filter escapes HTML characters, which would change tool / JSON renderings.
fn tojson(value: Value, args: Rest<Value>, kwargs: Kwargs) -> Result<String, Error> {
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    let mut opts: [Option<Value>; 4] = Default::default();
    if args.0.len() > names.len() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    for (slot, arg) in opts.iter_mut().zip(args.0) {
        *slot = Some(arg);
    }
    for (slot, name) in opts.iter_mut().zip(names) {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            *slot = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = opts;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (None, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: bad indent",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match separators.filter(|v| !v.is_none() && !v.is_undefined()) {
        Some(v) => {
            let a = v.get_item_by_index(0)?;
            let b = v.get_item_by_index(1)?;
            match (a.as_str(), b.as_str()) {
                (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: bad separators",
                    ))
                }
            }
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut dumper = PyJson {
        ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
        sort_keys: sort_keys.is_some_and(|v| v.is_true()),
        indent,
        item_sep,
        key_sep,
        out: String::new(),
    };
    dumper.value(&value, 0)?;
    Ok(dumper.out)
}

/// A writer following Python's `json.dumps` layout rules.
struct PyJson {
    ensure_ascii: bool,
    sort_keys: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    out: String,
}

impl PyJson {
    fn newline(&mut self, depth: usize) {
        if let Some(ind) = &self.indent {
            self.out.push('\n');
            for _ in 0..depth {
                self.out.push_str(ind);
            }
        }
    }

    fn value(&mut self, v: &Value, depth: usize) -> Result<(), Error> {
        use minijinja::value::ValueKind as K;
        match v.kind() {
            K::Undefined | K::None => self.out.push_str("null"),
            K::Bool => self
                .out
                .push_str(if v.is_true() { "true" } else { "false" }),
            K::Number => {
                if let Some(i) = v.as_i64() {
                    let _ = write!(self.out, "{i}");
                } else {
                    let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                    self.float(f);
                }
            }
            K::String => self.string(v.as_str().unwrap_or_default()),
            K::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                if keys.is_empty() {
                    self.out.push_str("{}");
                    return Ok(());
                }
                self.out.push('{');
                for (n, key) in keys.iter().enumerate() {
                    if n > 0 {
                        let sep = self.item_sep.clone();
                        self.out.push_str(&sep);
                    }
                    self.newline(depth + 1);
                    match key.as_str() {
                        Some(s) => self.string(s),
                        None => self.string(&key.to_string()),
                    }
                    let sep = self.key_sep.clone();
                    self.out.push_str(&sep);
                    self.value(&v.get_item(key)?, depth + 1)?;
                }
                self.newline(depth);
                self.out.push('}');
            }
            K::Seq | K::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    self.out.push_str("[]");
                    return Ok(());
                }
                self.out.push('[');
                for (n, item) in items.iter().enumerate() {
                    if n > 0 {
                        let sep = self.item_sep.clone();
                        self.out.push_str(&sep);
                    }
                    self.newline(depth + 1);
                    self.value(item, depth + 1)?;
                }
                self.newline(depth);
                self.out.push(']');
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: cannot serialise a {} value", v.kind()),
                ))
            }
        }
        Ok(())
    }

    /// Python's float repr: shortest round-trip digits, `.0` on integral values.
    fn float(&mut self, f: f64) {
        if f.is_nan() {
            self.out.push_str("NaN");
        } else if f.is_infinite() {
            self.out
                .push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
        } else if f.fract() == 0.0 && f.abs() < 1e16 {
            let _ = write!(self.out, "{f:.1}");
        } else {
            let _ = write!(self.out, "{f}");
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(self.out, "\\u{unit:04x}");
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}
