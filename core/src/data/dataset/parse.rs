//! One JSON record → [`Record`]: the LLaVA (`conversations`) and OpenAI (`messages`) shapes.
//!
//! Parsing is lenient about things validation reports better (placeholder counts, role
//! order, empty turns), so those problems are reported together with the record's other
//! problems rather than as one opaque parse error; it is strict about anything that leaves
//! the record's meaning unclear (unknown role, a value of the wrong JSON type).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{DatasetOptions, Record, RecordError, RecordErrorKind, SourceLocation};
use crate::data::{Conversation, Part, Role, Turn};

pub(super) fn parse_record(
    value: &Value,
    location: SourceLocation,
    options: &DatasetOptions,
) -> Result<Record, RecordError> {
    let mut parser = Parser {
        options,
        location: &location,
        images: Vec::new(),
        videos: Vec::new(),
        image_refs: 0,
        video_refs: 0,
        inline_paths: true,
    };
    let (conversation, id) = parser.parse(value).map_err(|message| RecordError {
        location: location.clone(),
        kind: RecordErrorKind::Schema,
        message,
    })?;
    Ok(Record {
        conversation,
        images: parser.images,
        videos: parser.videos,
        id,
        location,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum MediaKind {
    Image,
    Video,
}

impl MediaKind {
    fn name(self) -> &'static str {
        match self {
            MediaKind::Image => "image",
            MediaKind::Video => "video",
        }
    }
}

struct Parser<'a> {
    options: &'a DatasetOptions,
    location: &'a SourceLocation,
    images: Vec<PathBuf>,
    videos: Vec<PathBuf>,
    /// Media references seen so far (placeholders or media parts); the next one's index.
    image_refs: usize,
    video_refs: usize,
    /// OpenAI records without a top-level `images` / `videos` list carry paths in their
    /// media parts; with one, parts and placeholders point into that list instead.
    inline_paths: bool,
}

type Res<T> = Result<T, String>;

impl Parser<'_> {
    fn parse(&mut self, value: &Value) -> Res<(Conversation, Option<String>)> {
        let obj = value
            .as_object()
            .ok_or_else(|| format!("a record must be a JSON object, found {}", type_name(value)))?;
        let id = match obj.get("id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(other) => {
                return Err(format!(
                    "`id` must be a string or a number, found {}",
                    type_name(other)
                ))
            }
        };
        let top_images = self.media_list(obj, "image", "images", MediaKind::Image)?;
        let top_videos = self.media_list(obj, "video", "videos", MediaKind::Video)?;
        let system_prompt = match obj.get("system_prompt") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(other) => {
                return Err(format!(
                    "`system_prompt` must be a string, found {}",
                    type_name(other)
                ))
            }
        };

        let mut turns = Vec::new();
        if let Some(text) = system_prompt {
            turns.push(Turn::text(Role::System, text));
        }
        if let Some(messages) = obj.get("messages") {
            // OpenAI shape: media paths inline unless the record lists them at the top.
            self.inline_paths = top_images.is_none() && top_videos.is_none();
            self.images = top_images.unwrap_or_default();
            self.videos = top_videos.unwrap_or_default();
            let list = messages.as_array().ok_or_else(|| {
                format!("`messages` must be a list, found {}", type_name(messages))
            })?;
            for (i, message) in list.iter().enumerate() {
                turns.push(self.openai_turn(i, message)?);
            }
        } else if let Some(conversations) = obj.get("conversations") {
            self.inline_paths = false;
            self.images = top_images.unwrap_or_default();
            self.videos = top_videos.unwrap_or_default();
            let list = conversations.as_array().ok_or_else(|| {
                format!(
                    "`conversations` must be a list, found {}",
                    type_name(conversations)
                )
            })?;
            for (i, turn) in list.iter().enumerate() {
                turns.push(self.llava_turn(i, turn)?);
            }
        } else {
            return Err(
                "the record has no `conversations` list (LLaVA format) and no `messages` \
                        list (OpenAI format)"
                    .into(),
            );
        }

        // LLaVA / lmms-finetune convention: media with no placeholder at all goes in front
        // of the first user turn (images, then videos).
        let mut front = Vec::new();
        if self.image_refs == 0 {
            front.extend((0..self.images.len()).map(|index| Part::Image { index }));
        }
        if self.video_refs == 0 {
            front.extend((0..self.videos.len()).map(|index| Part::Video { index }));
        }
        if !front.is_empty() {
            if let Some(turn) = turns.iter_mut().find(|t| t.role == Role::User) {
                front.append(&mut turn.parts);
                turn.parts = front;
            }
        }
        Ok((Conversation { turns }, id))
    }

    fn media_list(
        &self,
        obj: &Map<String, Value>,
        singular: &str,
        plural: &str,
        kind: MediaKind,
    ) -> Res<Option<Vec<PathBuf>>> {
        let present = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let (key, value) = match (present(singular), present(plural)) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "the record has both `{singular}` and `{plural}`; use one"
                ))
            }
            (Some(v), None) => (singular, v),
            (None, Some(v)) => (plural, v),
            (None, None) => return Ok(None),
        };
        let strings: Vec<&str> = match value {
            Value::String(s) => vec![s.as_str()],
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str().ok_or_else(|| {
                        format!("`{key}[{i}]` must be a path string, found {}", type_name(v))
                    })
                })
                .collect::<Res<_>>()?,
            other => {
                return Err(format!(
                    "`{key}` must be a path string or a list of path strings, found {}",
                    type_name(other)
                ))
            }
        };
        strings
            .into_iter()
            .map(|s| self.resolve(s, kind).map_err(|e| format!("`{key}`: {e}")))
            .collect::<Res<Vec<_>>>()
            .map(Some)
    }

    fn resolve(&self, raw: &str, kind: MediaKind) -> Res<PathBuf> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(format!("empty {} path", kind.name()));
        }
        let lower = raw.to_ascii_lowercase();
        if lower.starts_with("http://")
            || lower.starts_with("https://")
            || lower.starts_with("data:")
        {
            return Err(format!(
                "{} '{}' is not a local file; only local paths are supported",
                kind.name(),
                truncate(raw, 60)
            ));
        }
        let raw = raw.strip_prefix("file://").unwrap_or(raw);
        let path = Path::new(raw);
        if path.is_absolute() {
            return Ok(path.to_path_buf());
        }
        let folder = match kind {
            MediaKind::Image => self.options.image_folder.as_deref(),
            MediaKind::Video => self.options.video_folder.as_deref(),
        };
        let base = folder.unwrap_or_else(|| self.location.file.parent().unwrap_or(Path::new("")));
        Ok(base.join(path))
    }

    fn role(&self, name: &str) -> Option<Role> {
        let o = self.options;
        if name == o.user_role || name == "user" {
            Some(Role::User)
        } else if name == o.assistant_role || name == "assistant" {
            Some(Role::Assistant)
        } else if name == o.system_role || name == "system" {
            Some(Role::System)
        } else {
            None
        }
    }

    fn role_of(&self, field: &str, value: &Value) -> Res<Role> {
        let name = value
            .as_str()
            .ok_or_else(|| format!("`{field}` must be a string, found {}", type_name(value)))?;
        self.role(name).ok_or_else(|| {
            let o = self.options;
            let names = |configured: &str, standard: &str| {
                if configured == standard {
                    format!("\"{standard}\"")
                } else {
                    format!("\"{configured}\" or \"{standard}\"")
                }
            };
            format!(
                "`{field}` is \"{name}\", which is not a known role (user: {}; assistant: {}; \
                 system: {})",
                names(&o.user_role, "user"),
                names(&o.assistant_role, "assistant"),
                names(&o.system_role, "system")
            )
        })
    }

    fn llava_turn(&mut self, i: usize, turn: &Value) -> Res<Turn> {
        let obj = turn.as_object().ok_or_else(|| {
            format!(
                "`conversations[{i}]` must be an object, found {}",
                type_name(turn)
            )
        })?;
        let (role_key, role_value) = first_key(obj, &["from", "role"])
            .ok_or_else(|| format!("`conversations[{i}]` has no `from`"))?;
        let role = self.role_of(&format!("conversations[{i}].{role_key}"), role_value)?;
        let (text_key, text_value) = first_key(obj, &["value", "content"])
            .ok_or_else(|| format!("`conversations[{i}]` has no `value`"))?;
        let text = text_value.as_str().ok_or_else(|| {
            format!(
                "`conversations[{i}].{text_key}` must be a string, found {}",
                type_name(text_value)
            )
        })?;
        let mut parts = Vec::new();
        self.split_text(text, &mut parts);
        Ok(Turn { role, parts })
    }

    fn openai_turn(&mut self, i: usize, message: &Value) -> Res<Turn> {
        let obj = message.as_object().ok_or_else(|| {
            format!(
                "`messages[{i}]` must be an object, found {}",
                type_name(message)
            )
        })?;
        let role_value = obj
            .get("role")
            .ok_or_else(|| format!("`messages[{i}]` has no `role`"))?;
        let role = self.role_of(&format!("messages[{i}].role"), role_value)?;
        let mut parts = Vec::new();
        match obj.get("content") {
            None | Some(Value::Null) => {}
            Some(Value::String(text)) => self.split_text(text, &mut parts),
            Some(Value::Array(items)) => {
                for (j, item) in items.iter().enumerate() {
                    self.openai_part(&format!("messages[{i}].content[{j}]"), item, &mut parts)?;
                }
            }
            Some(other) => {
                return Err(format!(
                    "`messages[{i}].content` must be a string or a list of parts, found {}",
                    type_name(other)
                ))
            }
        }
        Ok(Turn { role, parts })
    }

    fn openai_part(&mut self, at: &str, item: &Value, parts: &mut Vec<Part>) -> Res<()> {
        let obj = item
            .as_object()
            .ok_or_else(|| format!("`{at}` must be an object, found {}", type_name(item)))?;
        let ty = obj
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("`{at}` has no string `type`"))?;
        let kind = match ty {
            "text" => {
                let text = obj
                    .get("text")
                    .ok_or_else(|| format!("`{at}` has no `text`"))?;
                let text = text.as_str().ok_or_else(|| {
                    format!("`{at}.text` must be a string, found {}", type_name(text))
                })?;
                self.split_text(text, parts);
                return Ok(());
            }
            "image" | "image_url" => MediaKind::Image,
            "video" | "video_url" => MediaKind::Video,
            other => {
                return Err(format!(
                    "`{at}.type` is \"{other}\"; expected \"text\", \"image\" or \"video\""
                ))
            }
        };
        let keys: &[&str] = match kind {
            MediaKind::Image => &["image", "image_url", "path"],
            MediaKind::Video => &["video", "video_url", "path"],
        };
        let path = match first_key(obj, keys) {
            None => None,
            Some((key, Value::String(s))) => Some((key, s.as_str())),
            Some((key, Value::Object(o))) => match o.get("url") {
                Some(Value::String(s)) => Some((key, s.as_str())),
                _ => return Err(format!("`{at}.{key}` must be a path or {{\"url\": path}}")),
            },
            Some((key, Value::Array(_))) if kind == MediaKind::Video => {
                return Err(format!(
                    "`{at}.{key}` is a list of frames, which is not supported; give a video file"
                ))
            }
            Some((key, other)) => {
                return Err(format!(
                    "`{at}.{key}` must be a path string, found {}",
                    type_name(other)
                ))
            }
        };
        let name = kind.name();
        match (path, self.inline_paths) {
            (Some((key, raw)), true) => {
                let resolved = self
                    .resolve(raw, kind)
                    .map_err(|e| format!("`{at}.{key}`: {e}"))?;
                match kind {
                    MediaKind::Image => self.images.push(resolved),
                    MediaKind::Video => self.videos.push(resolved),
                }
            }
            (Some((key, _)), false) => {
                return Err(format!(
                    "`{at}.{key}` gives a path although the record lists its media in \
                     `{name}s`; use one or the other"
                ))
            }
            (None, true) => {
                return Err(format!(
                    "`{at}` has no `{name}` path and the record has no `{name}s` list"
                ))
            }
            (None, false) => {}
        }
        parts.push(self.next_ref(kind));
        Ok(())
    }

    fn next_ref(&mut self, kind: MediaKind) -> Part {
        match kind {
            MediaKind::Image => {
                self.image_refs += 1;
                Part::Image {
                    index: self.image_refs - 1,
                }
            }
            MediaKind::Video => {
                self.video_refs += 1;
                Part::Video {
                    index: self.video_refs - 1,
                }
            }
        }
    }

    /// Splits `text` at each placeholder, keeping order. A placeholder that comes before any
    /// text of the string swallows one newline right after it (the LLaVA `"<image>\n..."`
    /// convention), because chat templates put their own separator after media; newlines
    /// anywhere else are kept.
    fn split_text(&mut self, text: &str, parts: &mut Vec<Part>) {
        let image = self.options.image_placeholder.clone();
        let video = self.options.video_placeholder.clone();
        let mut rest = text;
        let mut leading = true;
        loop {
            let find = |p: &str| (!p.is_empty()).then(|| rest.find(p)).flatten();
            let next = match (find(&image), find(&video)) {
                (Some(a), Some(b)) if b < a => Some((b, MediaKind::Video)),
                (Some(a), _) => Some((a, MediaKind::Image)),
                (None, Some(b)) => Some((b, MediaKind::Video)),
                (None, None) => None,
            };
            let Some((pos, kind)) = next else {
                if !rest.is_empty() {
                    parts.push(Part::Text {
                        text: rest.to_string(),
                    });
                }
                return;
            };
            if pos > 0 {
                parts.push(Part::Text {
                    text: rest[..pos].to_string(),
                });
                leading = false;
            }
            parts.push(self.next_ref(kind));
            let len = match kind {
                MediaKind::Image => image.len(),
                MediaKind::Video => video.len(),
            };
            rest = &rest[pos + len..];
            if leading {
                rest = rest
                    .strip_prefix("\r\n")
                    .or_else(|| rest.strip_prefix('\n'))
                    .unwrap_or(rest);
            }
        }
    }
}

fn first_key<'v>(
    obj: &'v Map<String, Value>,
    keys: &[&'static str],
) -> Option<(&'static str, &'v Value)> {
    keys.iter()
        .find_map(|k| obj.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)))
}

pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}
