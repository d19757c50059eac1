//! Hugging Face chat templates: discovery, rendering, tokenisation and label masks.
//!
//! A model directory's Jinja template is rendered with minijinja set up like `transformers`'
//! Jinja2 environment, so the text equals `apply_chat_template(..., tokenize=False)`. The
//! text is tokenised with the directory's `tokenizer.json` without adding special tokens
//! (templates write their own BOS), then each image / video placeholder token is repeated as
//! often as the processor says.
//!
//! # The label rule
//!
//! One rule for every family, so no adapter has to describe its turn format:
//!
//! * **Labeled**: for every assistant turn, each token that overlaps the bytes of one of the
//!   turn's text contents, plus the end-of-turn tokens the template writes right after the
//!   content — the added / special tokens that immediately follow the last content token
//!   (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, `</s>`), stopping at the first ordinary token.
//!   "Overlaps" rather than "lies inside" because tokenizers glue a separator to the next word
//!   (Llama's `▁Hello` after `ASSISTANT:`): that token is the model's first answer token and
//!   must be learned.
//! * **Not labeled** ([`IGNORE_INDEX`]): system and user turns, role headers, everything the
//!   template adds between turns, media placeholder tokens (also inside assistant turns), and
//!   later padding.
//! * With `label_all`, every token except media tokens is labeled.
//!
//! Assistant contents are located by rendering twice, once with unique sentinels in place of
//! the assistant texts (see [`ChatRenderer::assistant_spans`]).
//!
//! Where a token would straddle the start of an assistant content or the end of an
//! assistant turn's generation prompt (Qwen's `\n` after `<|im_start|>assistant` merges with
//! a content that begins with a newline; llava-interleave writes `\n` + content after a
//! prompt ending in `\n`, giving `\n\n`), the text is tokenised in pieces split at that
//! point, provided the pieces decode to the same text as the whole. The model then sees at training what it sees at inference (the prompt ends
//! there and generation starts a fresh token), the prompt's ids stay a prefix of the
//! training ids, and labels never cover template text. Tokenizers that would change the text
//! when split (SentencePiece prepending `▁`) keep whole-string tokenisation.

mod discovery;
mod render;

use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::Tokenizer;

pub use discovery::{
    discover_template, load_dir_tokenizer, tokenizer_path, SpecialTokens, TemplateSource,
};
pub use render::{strip_generation_tags, AssistantSpans, ChatRenderer, ContentMode};

use crate::data::{Conversation, Part, Role};
use crate::family::{ChatTemplate, EncodedText, MediaTokens, IGNORE_INDEX};

/// The token strings a family's template writes for one image / video; each occurrence is
/// expanded to that media's token count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MediaPlaceholders {
    pub image: Option<String>,
    pub video: Option<String>,
}

impl MediaPlaceholders {
    pub fn new(image: &str, video: Option<&str>) -> Self {
        Self {
            image: Some(image.to_string()),
            video: video.map(str::to_string),
        }
    }
}

/// Loads a `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| anyhow!("loading tokenizer {}: {e}", path.display()))
}

/// A Hub chat template with its tokenizer: the [`ChatTemplate`] every HF-style family uses.
pub struct HfChatTemplate {
    renderer: ChatRenderer,
    tokenizer: Tokenizer,
    image_id: Option<u32>,
    video_id: Option<u32>,
    /// Added / special token ids: the candidates for end-of-turn tokens.
    added: HashSet<u32>,
}

/// Token ids with byte offsets into the rendered text.
#[derive(Default)]
struct Tokens {
    ids: Vec<u32>,
    offsets: Vec<(usize, usize)>,
}

impl HfChatTemplate {
    /// Template, special tokens and `tokenizer.json` of a model directory.
    pub fn from_dir(
        dir: &Path,
        media: MediaPlaceholders,
        content_mode: ContentMode,
    ) -> Result<Self> {
        let renderer = ChatRenderer::new(
            discover_template(dir)?,
            SpecialTokens::from_dir(dir)?,
            content_mode,
        )?;
        let tokenizer = load_dir_tokenizer(dir)?;
        Self::new(renderer, tokenizer, media)
    }

    /// Like [`HfChatTemplate::from_dir`] but with the adapter's own training template, for
    /// families whose Hub template is unfit for training (llava-1.5's writes no end-of-turn
    /// token, so a model trained on it would never learn to stop).
    pub fn with_training_template(
        dir: &Path,
        template: &str,
        media: MediaPlaceholders,
        content_mode: ContentMode,
    ) -> Result<Self> {
        let source = TemplateSource {
            source: template.to_string(),
            origin: format!("training template for {}", dir.display()),
        };
        let renderer = ChatRenderer::new(source, SpecialTokens::from_dir(dir)?, content_mode)?;
        let tokenizer = load_dir_tokenizer(dir)?;
        Self::new(renderer, tokenizer, media)
    }

    /// Joins a renderer and a tokenizer. The placeholders must be single tokens of the
    /// tokenizer, otherwise expansion could not find them.
    pub fn new(
        renderer: ChatRenderer,
        tokenizer: Tokenizer,
        media: MediaPlaceholders,
    ) -> Result<Self> {
        let id_of = |token: &Option<String>, what: &str| -> Result<Option<u32>> {
            token
                .as_deref()
                .map(|t| {
                    tokenizer.token_to_id(t).with_context(|| {
                        format!("the {what} placeholder {t:?} is not a token of the tokenizer")
                    })
                })
                .transpose()
        };
        let image_id = id_of(&media.image, "image")?;
        let video_id = id_of(&media.video, "video")?;
        let added = tokenizer.get_added_tokens_decoder().into_keys().collect();
        Ok(Self {
            renderer,
            tokenizer,
            image_id,
            video_id,
            added,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn renderer(&self) -> &ChatRenderer {
        &self.renderer
    }

    /// The rendered text, as `apply_chat_template(..., tokenize=False)`.
    pub fn render(&self, conv: &Conversation, add_generation_prompt: bool) -> Result<String> {
        self.renderer.render(conv, add_generation_prompt)
    }

    fn is_media(&self, id: u32) -> bool {
        Some(id) == self.image_id || Some(id) == self.video_id
    }

    fn encode_piece(&self, text: &str, base: usize, out: &mut Tokens) -> Result<()> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("tokenising the rendered conversation: {e}"))?;
        out.ids.extend_from_slice(enc.get_ids());
        out.offsets
            .extend(enc.get_offsets().iter().map(|&(s, e)| (s + base, e + base)));
        Ok(())
    }

    /// Tokenises `text`, split at those `starts` a token would straddle (see the module doc).
    fn tokenize(&self, text: &str, starts: &[usize]) -> Result<Tokens> {
        let mut whole = Tokens::default();
        self.encode_piece(text, 0, &mut whole)?;
        let straddled: Vec<usize> = starts
            .iter()
            .copied()
            .filter(|&b| whole.offsets.iter().any(|&(s, e)| s < b && b < e))
            .collect();
        if straddled.is_empty() {
            return Ok(whole);
        }
        let mut pieces = Tokens::default();
        let mut prev = 0;
        for b in straddled.into_iter().chain([text.len()]) {
            if b > prev {
                self.encode_piece(&text[prev..b], prev, &mut pieces)?;
                prev = b;
            }
        }
        let decode = |ids: &[u32]| {
            self.tokenizer
                .decode(ids, false)
                .map_err(|e| anyhow!("decoding for the split check: {e}"))
        };
        if decode(&pieces.ids)? == decode(&whole.ids)? {
            Ok(pieces)
        } else {
            Ok(whole)
        }
    }

    /// Labels per the module's rule, before media expansion.
    fn labels(&self, tokens: &Tokens, turns: &[Vec<Range<usize>>], label_all: bool) -> Vec<i64> {
        let ids: Vec<i64> = tokens.ids.iter().map(|&id| id as i64).collect();
        label_rule(
            &ids,
            &tokens.offsets,
            turns,
            &|id| u32::try_from(id).is_ok_and(|id| self.added.contains(&id)),
            &|id| u32::try_from(id).is_ok_and(|id| self.is_media(id)),
            label_all,
        )
    }

    /// Repeats the i-th image (video) placeholder `media.images[i]` (`videos[i]`) times.
    fn expand(&self, ids: &[u32], labels: &[i64], media: &MediaTokens) -> Result<EncodedText> {
        let count = |id: Option<u32>| id.map_or(0, |m| ids.iter().filter(|&&t| t == m).count());
        let (n_img, n_vid) = (count(self.image_id), count(self.video_id));
        for (what, found, given, token) in [
            ("image", n_img, media.images.len(), &self.image_id),
            ("video", n_vid, media.videos.len(), &self.video_id),
        ] {
            if found != given {
                let name = token
                    .and_then(|t| self.tokenizer.id_to_token(t))
                    .unwrap_or_else(|| "(no placeholder configured)".into());
                bail!(
                    "the rendered conversation has {found} {what} placeholder(s) {name} but \
                     {given} {what}(s) were given"
                );
            }
        }
        let total =
            ids.len() + media.images.iter().sum::<usize>() + media.videos.iter().sum::<usize>()
                - n_img
                - n_vid;
        let mut out = EncodedText {
            input_ids: Vec::with_capacity(total),
            labels: Vec::with_capacity(total),
        };
        let (mut img, mut vid) = (media.images.iter(), media.videos.iter());
        for (&id, &label) in ids.iter().zip(labels) {
            let repeat = if Some(id) == self.image_id {
                img.next().copied()
            } else if Some(id) == self.video_id {
                vid.next().copied()
            } else {
                None
            };
            match repeat {
                Some(k) => {
                    out.input_ids.extend(std::iter::repeat_n(id as i64, k));
                    out.labels.extend(std::iter::repeat_n(IGNORE_INDEX, k));
                }
                None => {
                    out.input_ids.push(id as i64);
                    out.labels.push(label);
                }
            }
        }
        Ok(out)
    }

    fn encode_text(
        &self,
        conv: &Conversation,
        add_generation_prompt: bool,
        media: &MediaTokens,
        label_all: bool,
    ) -> Result<EncodedText> {
        let spans = self.renderer.assistant_spans(conv, add_generation_prompt)?;
        let mut starts: Vec<usize> = spans.turns.iter().flatten().map(|r| r.start).collect();
        // Where each assistant turn's generation prompt ends: inference tokenises the prompt
        // alone, so training must not merge its last token with the answer.
        for (i, turn) in conv.turns.iter().enumerate() {
            if turn.role == Role::Assistant {
                let head = Conversation {
                    turns: conv.turns[..i].to_vec(),
                };
                let prompt = self.renderer.render(&head, true)?;
                if spans.text.starts_with(&prompt) {
                    starts.push(prompt.len());
                }
            }
        }
        starts.sort_unstable();
        starts.dedup();
        let tokens = self.tokenize(&spans.text, &starts)?;
        let labels = self.labels(&tokens, &spans.turns, label_all);
        self.expand(&tokens.ids, &labels, media)
    }
}

/// The module's label rule over tokens with byte `offsets` into the rendered text (media
/// tokens may carry empty offsets): `turns` are the assistant contents per turn,
/// `is_added` tells added / special tokens (end-of-turn candidates), `is_media` media tokens.
/// Public for templates that tokenise in their own way (Phi-3-V's processor tokenises the
/// text between image tags separately).
pub fn label_rule(
    ids: &[i64],
    offsets: &[(usize, usize)],
    turns: &[Vec<Range<usize>>],
    is_added: &dyn Fn(i64) -> bool,
    is_media: &dyn Fn(i64) -> bool,
    label_all: bool,
) -> Vec<i64> {
    let n = ids.len();
    if label_all {
        return ids
            .iter()
            .map(|&id| if is_media(id) { IGNORE_INDEX } else { id })
            .collect();
    }
    let mut labels = vec![IGNORE_INDEX; n];
    for span in turns.iter().flatten() {
        let mut last = None;
        for (i, &(s, e)) in offsets.iter().enumerate() {
            if s < span.end && e > span.start && e > s && !is_media(ids[i]) {
                labels[i] = ids[i];
                last = Some(i);
            }
        }
        let mut next = match last {
            Some(i) => i + 1,
            None => offsets
                .iter()
                .position(|&(s, _)| s >= span.end)
                .unwrap_or(n),
        };
        while next < n && is_added(ids[next]) && !is_media(ids[next]) {
            labels[next] = ids[next];
            next += 1;
        }
    }
    labels
}

impl ChatTemplate for HfChatTemplate {
    fn is_media_token(&self, id: i64) -> bool {
        u32::try_from(id).is_ok_and(|id| self.is_media(id))
    }

    fn encode(
        &self,
        conv: &Conversation,
        media: &MediaTokens,
        label_all: bool,
    ) -> Result<EncodedText> {
        self.encode_text(conv, false, media, label_all)
    }

    /// Drops a final assistant turn (and its media, which come last in placeholder order),
    /// then renders with the generation prompt.
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
                    let list = match part {
                        Part::Image { .. } => &mut media.images,
                        Part::Video { .. } => &mut media.videos,
                        Part::Text { .. } => continue,
                    };
                    list.pop();
                }
            }
        }
        Ok(self.encode_text(&prompt, true, &media, false)?.input_ids)
    }

    fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| anyhow!("decoding generated tokens: {e}"))
    }

    /// The end-of-turn tokens the label rule finds after an assistant reply in a probe
    /// conversation, plus the tokenizer's `eos_token`.
    fn stop_token_ids(&self) -> Vec<i64> {
        let probe = Conversation {
            turns: vec![
                crate::data::Turn::text(Role::User, "Hi"),
                crate::data::Turn::text(Role::Assistant, "Hello"),
            ],
        };
        let mut ids: Vec<i64> = self
            .encode_text(&probe, false, &MediaTokens::default(), false)
            .map(|enc| {
                enc.labels
                    .iter()
                    .filter(|&&l| l != IGNORE_INDEX && self.added.contains(&(l as u32)))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        if let Some(id) = self
            .renderer
            .special_tokens()
            .get("eos_token")
            .and_then(|t| self.tokenizer.token_to_id(t))
        {
            ids.push(id as i64);
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}
