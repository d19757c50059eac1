//! The family-independent form of one training sample.

use image::RgbImage;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role name chat templates expect in `message.role`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// A piece of a turn. Media parts refer to the sample's media by index, in the order the
/// placeholders appear, so interleaved text and media keep their order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Part {
    Text { text: String },
    Image { index: usize },
    Video { index: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub role: Role,
    pub parts: Vec<Part>,
}

impl Turn {
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Turn {
            role,
            parts: vec![Part::Text { text: text.into() }],
        }
    }
}

/// A conversation: an optional system turn first, then user / assistant turns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub turns: Vec<Turn>,
}

/// Decoded frames of one video with the timing the processors need.
#[derive(Debug, Clone)]
pub struct VideoClip {
    pub frames: Vec<RgbImage>,
    /// Frames per second of the sampled frames (not of the source file).
    pub sampled_fps: f64,
}

/// The decoded images and videos of one sample, in placeholder order.
#[derive(Debug, Clone, Default)]
pub struct DecodedMedia {
    pub images: Vec<RgbImage>,
    pub videos: Vec<VideoClip>,
}
