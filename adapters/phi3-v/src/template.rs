//! Phi-3-V's prompt format, as `Phi3VProcessor` builds it: the Hub chat template renders each
//! image as `<|image_N|>` (numbered from 1 per sample), the text between those tags is
//! tokenised piece by piece *with* the tokenizer's special tokens (so every piece, the one
//! after each image included, starts with `<s>`), and each tag becomes `-N` repeated as many
//! times as image N has tokens. Negative ids are the media tokens.
//!
//! The tokenizer is the directory's `tokenizer.json` exactly as written: the Hub code runs on
//! transformers 4.x, which uses the file's legacy `Prepend("▁")` normalizer (a `▁` after
//! every special token, `<|end|>`, `▁`, `\n`), not the Metaspace rebuild transformers 5 (and
//! the core's `load_dir_tokenizer`) makes of Llama tokenizers.
//!
//! Images are placed by the conversation's image parts, or, when the text has `<|image_N|>`
//! written in it (datasets in Phi-3-V's own format), by those tags alone; either way every
//! image of the sample must be named and nothing else.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Result};
use lmms_ft_core::data::template::{
    discover_template, label_rule, tokenizer_path, AssistantSpans, ChatRenderer, ContentMode,
    HfChatTemplate, MediaPlaceholders, SpecialTokens,
};
use lmms_ft_core::data::{Conversation, Part, Role};
use lmms_ft_core::family::{ChatTemplate, EncodedText, MediaTokens};
use tokenizers::Tokenizer;

/// What the renderer writes for an image part; numbered afterwards in part order. The tag an
/// image part becomes is followed by a newline, as in the Hub's prompt format
/// (`<|image_1|>\n{question}`): the template writes the separator after media, as other
/// families' templates do (the dataset's `<image>\n` convention drops the newline written
/// after a leading `<image>`).
const IMAGE_MARK: &str = "\u{E000}lmms-image\u{E001}";
const IMAGE_PART: &str = "\u{E000}lmms-image\u{E001}\n";
const VIDEO_MARK: &str = "\u{E000}lmms-video\u{E001}";

pub struct Phi3VTemplate {
    inner: HfChatTemplate,
    added: HashSet<u32>,
}

/// One `<|image_N|>` (or an image part) in the rendered text.
struct Tag {
    range: std::ops::Range<usize>,
    image: usize,
}

/// `<|image_N|>` at the start of `s`: its length and N.
fn literal_tag(s: &str) -> Option<(usize, usize)> {
    let rest = s.strip_prefix("<|image_")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let n = rest[..digits].parse().ok()?;
    rest[digits..]
        .starts_with("|>")
        .then_some(("<|image_".len() + digits + 2, n))
}

impl Phi3VTemplate {
    pub fn from_dir(dir: &Path) -> Result<Phi3VTemplate> {
        let renderer = ChatRenderer::new(
            discover_template(dir)?,
            SpecialTokens::from_dir(dir)?,
            ContentMode::String {
                image: IMAGE_PART.into(),
                video: VIDEO_MARK.into(),
            },
        )?;
        let path = tokenizer_path(dir)?;
        let tokenizer =
            Tokenizer::from_file(&path).map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
        let inner = HfChatTemplate::new(renderer, tokenizer, MediaPlaceholders::default())?;
        let added = inner
            .tokenizer()
            .get_added_tokens_decoder()
            .into_keys()
            .collect();
        Ok(Phi3VTemplate { inner, added })
    }

    pub fn inner(&self) -> &HfChatTemplate {
        &self.inner
    }

    /// The image tags of a rendering, in order. Written `<|image_N|>` tags, when the text has
    /// any, place the images alone, and the image parts' marks are dropped (a dataset record
    /// without `<image>` placeholders gets its images as parts in front of the first user
    /// turn, which the tags then place instead); otherwise each image part is a tag for its
    /// own image. Returns the text without dropped marks, its assistant spans moved to match,
    /// and the tags.
    fn tags(
        &self,
        spans: AssistantSpans,
        conv: &Conversation,
    ) -> Result<(AssistantSpans, Vec<Tag>)> {
        let text = &spans.text;
        ensure!(
            !text.contains(VIDEO_MARK),
            "Phi-3-V takes no videos; give the frames as images instead"
        );
        let written =
            (0..text.len()).any(|i| text.is_char_boundary(i) && literal_tag(&text[i..]).is_some());
        let mut parts = conv
            .turns
            .iter()
            .flat_map(|t| &t.parts)
            .filter_map(|p| match p {
                Part::Image { index } => Some(*index + 1),
                _ => None,
            });
        let mut kept = String::with_capacity(text.len());
        // (position in the original text, bytes removed up to there), for moving the spans.
        let mut removed: Vec<(usize, usize)> = Vec::new();
        let mut tags = Vec::new();
        let mut at = 0;
        while at < text.len() {
            let rest = &text[at..];
            if rest.starts_with(IMAGE_MARK) {
                let image = parts.next().ok_or_else(|| {
                    anyhow!("the rendering has more images than the conversation")
                })?;
                if written {
                    // The part's separator goes with it.
                    let len = if rest.starts_with(IMAGE_PART) {
                        IMAGE_PART.len()
                    } else {
                        IMAGE_MARK.len()
                    };
                    removed.push((at + len, at + len - kept.len()));
                    at += len;
                    continue;
                }
                let start = kept.len();
                kept.push_str(IMAGE_MARK);
                tags.push(Tag {
                    range: start..kept.len(),
                    image,
                });
                at += IMAGE_MARK.len();
                continue;
            }
            if let Some((len, image)) = literal_tag(rest) {
                let start = kept.len();
                kept.push_str(&rest[..len]);
                tags.push(Tag {
                    range: start..kept.len(),
                    image,
                });
                at += len;
                continue;
            }
            let c = rest.chars().next().map_or(1, char::len_utf8);
            kept.push_str(&rest[..c]);
            at += c;
        }
        let shift = |pos: usize| {
            removed
                .iter()
                .rev()
                .find(|(end, _)| *end <= pos)
                .map_or(pos, |(_, gone)| pos - gone)
        };
        let turns = spans
            .turns
            .iter()
            .map(|turn| turn.iter().map(|r| shift(r.start)..shift(r.end)).collect())
            .collect();
        Ok((AssistantSpans { text: kept, turns }, tags))
    }

    fn encode_text(
        &self,
        conv: &Conversation,
        add_generation_prompt: bool,
        media: &MediaTokens,
        label_all: bool,
    ) -> Result<EncodedText> {
        ensure!(
            media.videos.is_empty(),
            "Phi-3-V takes no videos; give the frames as images instead"
        );
        let spans = self
            .inner
            .renderer()
            .assistant_spans(conv, add_generation_prompt)?;
        let (spans, tags) = self.tags(spans, conv)?;
        let text = &spans.text;
        let n = media.images.len();
        let mut named = vec![false; n];
        for tag in &tags {
            ensure!(
                (1..=n).contains(&tag.image),
                "<|image_{}|> names image {} but the sample has {n} image(s)",
                tag.image,
                tag.image
            );
            named[tag.image - 1] = true;
        }
        if let Some(missing) = named.iter().position(|&x| !x) {
            bail!(
                "image {} of the sample's {n} has no placeholder (an image part or <|image_{}|>)",
                missing + 1,
                missing + 1
            );
        }
        let mut ids: Vec<i64> = Vec::new();
        let mut offsets: Vec<(usize, usize)> = Vec::new();
        let mut start = 0;
        let pieces = tags.iter().map(Some).chain([None]);
        for tag in pieces {
            let end = tag.map_or(text.len(), |t| t.range.start);
            let enc = self
                .inner
                .tokenizer()
                .encode(&text[start..end], true)
                .map_err(|e| anyhow!("tokenising the rendered conversation: {e}"))?;
            ids.extend(enc.get_ids().iter().map(|&i| i as i64));
            offsets.extend(
                enc.get_offsets()
                    .iter()
                    .map(|&(s, e)| (s + start, e + start)),
            );
            if let Some(tag) = tag {
                let count = media.images[tag.image - 1];
                ids.extend(std::iter::repeat_n(-(tag.image as i64), count));
                let at = tag.range.start;
                offsets.extend(std::iter::repeat_n((at, at), count));
                start = tag.range.end;
            }
        }
        let labels = label_rule(
            &ids,
            &offsets,
            &spans.turns,
            &|id| u32::try_from(id).is_ok_and(|id| self.added.contains(&id)),
            &|id| id < 0,
            label_all,
        );
        Ok(EncodedText {
            input_ids: ids,
            labels,
        })
    }
}

impl ChatTemplate for Phi3VTemplate {
    fn is_media_token(&self, id: i64) -> bool {
        id < 0
    }

    fn encode(
        &self,
        conv: &Conversation,
        media: &MediaTokens,
        label_all: bool,
    ) -> Result<EncodedText> {
        self.encode_text(conv, false, media, label_all)
    }

    /// Drops a final assistant turn (and the images only it names), then renders with the
    /// generation prompt.
    fn encode_prompt(&self, conv: &Conversation, media: &MediaTokens) -> Result<Vec<i64>> {
        let mut prompt = conv.clone();
        let mut media = media.clone();
        if prompt
            .turns
            .last()
            .is_some_and(|t| t.role == Role::Assistant)
        {
            if let Some(last) = prompt.turns.pop() {
                for part in &last.parts {
                    if matches!(part, Part::Image { .. }) {
                        media.images.pop();
                    }
                }
            }
        }
        Ok(self.encode_text(&prompt, true, &media, false)?.input_ids)
    }

    fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<i64> = ids.iter().copied().filter(|&i| i >= 0).collect();
        self.inner.decode(&ids)
    }

    fn stop_token_ids(&self) -> Vec<i64> {
        self.inner.stop_token_ids()
    }
}
