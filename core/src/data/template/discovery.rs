//! Finding a model directory's chat template and special tokens the way `transformers` does.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

/// Where a template came from, kept so errors can name the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSource {
    /// The Jinja source exactly as stored (before any preprocessing).
    pub source: String,
    /// The file it was read from (or a description for caller-given templates).
    pub origin: String,
}

/// Reads the chat template of `dir` in Hugging Face's order of precedence:
/// `chat_template.jinja`, then `chat_template.json` (`{"chat_template": ...}`), then the
/// `chat_template` key of `tokenizer_config.json` (a string, or a list of named templates of
/// which `default` is used). A processor's template wins over a tokenizer's because for
/// multimodal repos the tokenizer's one is often the text-only template of the base LLM
/// (llava-interleave's is).
pub fn discover_template(dir: &Path) -> Result<TemplateSource> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let source = std::fs::read_to_string(&jinja)
            .with_context(|| format!("reading {}", jinja.display()))?;
        return Ok(TemplateSource {
            source,
            origin: jinja.display().to_string(),
        });
    }
    let json_path = dir.join("chat_template.json");
    if json_path.is_file() {
        let value = read_json(&json_path)?;
        let template = value
            .get("chat_template")
            .with_context(|| format!("{}: no \"chat_template\" key", json_path.display()))?;
        return template_from_value(template, &json_path);
    }
    let config_path = dir.join("tokenizer_config.json");
    if config_path.is_file() {
        let value = read_json(&config_path)?;
        if let Some(template) = value.get("chat_template").filter(|v| !v.is_null()) {
            return template_from_value(template, &config_path);
        }
    }
    bail!(
        "no chat template in {}: looked for chat_template.jinja, chat_template.json and the \
         \"chat_template\" key of tokenizer_config.json",
        dir.display()
    )
}

/// Interprets a `chat_template` value: a string, or a list of `{name, template}` entries.
fn template_from_value(value: &Json, path: &Path) -> Result<TemplateSource> {
    match value {
        Json::String(s) => Ok(TemplateSource {
            source: s.clone(),
            origin: path.display().to_string(),
        }),
        Json::Array(items) => {
            let mut names = Vec::new();
            for item in items {
                let name = item.get("name").and_then(Json::as_str);
                let template = item.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => {
                        return Ok(TemplateSource {
                            source: t.to_string(),
                            origin: format!("{} (template \"default\")", path.display()),
                        })
                    }
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => bail!(
                        "{}: each entry of the chat_template list needs string \"name\" and \
                         \"template\" keys, got {item}",
                        path.display()
                    ),
                }
            }
            bail!(
                "{}: the chat_template list has no \"default\" entry (it has: {})",
                path.display(),
                names.join(", ")
            )
        }
        other => bail!(
            "{}: chat_template must be a string or a list of {{name, template}}, got {other}",
            path.display()
        ),
    }
}

/// Special-token strings handed to the template as variables (`bos_token`, `eos_token`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `(variable name, token text)` in file order; later entries override earlier ones.
    pub tokens: Vec<(String, String)>,
}

impl SpecialTokens {
    /// Reads `*_token` keys and `extra_special_tokens` from `tokenizer_config.json`, like
    /// `transformers` passes its `special_tokens_map` to the template. A missing file gives
    /// no tokens (template-only directories exist); values may be plain strings or
    /// `AddedToken` dicts (`{"content": ...}`); `null` values are skipped.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let value = read_json(&path)?;
        Self::from_tokenizer_config(&value).with_context(|| format!("reading {}", path.display()))
    }

    /// See [`SpecialTokens::from_dir`].
    pub fn from_tokenizer_config(value: &Json) -> Result<Self> {
        let Some(map) = value.as_object() else {
            bail!("tokenizer_config.json must hold a JSON object");
        };
        let mut out = SpecialTokens::default();
        for (key, v) in map {
            if key.ends_with("_token") {
                if let Some(text) = token_text(v)
                    .with_context(|| format!("key \"{key}\" is not a token string or dict"))?
                {
                    out.set(key, text);
                }
            }
        }
        if let Some(extra) = map.get("extra_special_tokens").and_then(Json::as_object) {
            for (key, v) in extra {
                if let Some(text) = token_text(v).with_context(|| {
                    format!("extra_special_tokens.{key} is not a token string or dict")
                })? {
                    out.set(key, text);
                }
            }
        }
        Ok(out)
    }

    /// Sets or replaces a variable.
    pub fn set(&mut self, name: &str, text: String) {
        if let Some(entry) = self.tokens.iter_mut().find(|(n, _)| n == name) {
            entry.1 = text;
        } else {
            self.tokens.push((name.to_string(), text));
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.tokens
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }
}

/// A token given as a string or an `AddedToken` dict; `Ok(None)` for `null`.
fn token_text(value: &Json) -> Result<Option<String>> {
    match value {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(s.clone())),
        Json::Object(o) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => bail!("dict without a string \"content\""),
        },
        // Booleans and numbers (e.g. `add_bos_token`-like keys ending in `_token`) are not tokens.
        _ => Ok(None),
    }
}

fn read_json(path: &Path) -> Result<Json> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {} as JSON", path.display()))
}

/// `tokenizer.json` of a model directory, with a hint for folders that ship only the slow
/// tokenizer files.
pub fn tokenizer_path(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("tokenizer.json");
    if path.is_file() {
        return Ok(path);
    }
    let slow = ["vocab.json", "merges.txt", "tokenizer.model"]
        .iter()
        .filter(|f| dir.join(f).is_file())
        .copied()
        .collect::<Vec<_>>();
    if slow.is_empty() {
        bail!("no tokenizer.json in {}", dir.display())
    }
    bail!(
        "no tokenizer.json in {} (it has {}); convert it once with transformers: \
         AutoTokenizer.from_pretrained(dir).save_pretrained(dir)",
        dir.display(),
        slow.join(", ")
    )
}

/// Loads a model directory's `tokenizer.json` as `transformers` 5 uses it. For
/// `LlamaTokenizer(Fast)` transformers ignores the file's normalizer / pre-tokenizer /
/// decoder and rebuilds them from `tokenizer_config.json` (`legacy`, `add_prefix_space`):
/// Metaspace with `prepend_scheme` "first" instead of the Hub file's legacy `Prepend("▁")`
/// normalizer, which would otherwise put a `▁` after every special token (`<image>\n`
/// tokenises as `<image>`, `▁`, `\n` with the file as written, `<image>`, `\n` in
/// transformers).
pub fn load_dir_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = tokenizer_path(dir)?;
    let mut tok = read_json(&path)?;
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.is_file() {
        read_json(&config_path)?
    } else {
        Json::Null
    };
    let class = config
        .get("tokenizer_class")
        .and_then(Json::as_str)
        .unwrap_or("");
    if matches!(class, "LlamaTokenizer" | "LlamaTokenizerFast") {
        let add_prefix_space = config
            .get("add_prefix_space")
            .and_then(Json::as_bool)
            .unwrap_or(true);
        let legacy = config
            .get("legacy")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        let scheme = match (add_prefix_space, legacy) {
            (false, _) => "never",
            (true, false) => "first",
            (true, true) => "always",
        };
        let mut decoders = vec![
            serde_json::json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
            serde_json::json!({"type": "ByteFallback"}),
            serde_json::json!({"type": "Fuse"}),
        ];
        if add_prefix_space {
            decoders
                .push(serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let Some(obj) = tok.as_object_mut() else {
            bail!("{}: not a JSON object", path.display());
        };
        obj.insert("normalizer".into(), Json::Null);
        obj.insert(
            "pre_tokenizer".into(),
            serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": false}),
        );
        obj.insert(
            "decoder".into(),
            serde_json::json!({"type": "Sequence", "decoders": decoders}),
        );
    }
    let text = tok.to_string();
    text.parse::<tokenizers::Tokenizer>()
        .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", path.display()))
}
