//! Everything between a dataset file and a batch, shared by every family:
//! dataset formats ([`dataset`]), media decoding ([`media`], [`video`]), chat templates and
//! label masks ([`template`]), truncation / padding / packing / sampling ([`batch`]),
//! background loading ([`loader`]) and pre-flight checks ([`validate`]).

pub mod batch;
mod conversation;
pub mod dataset;
pub mod loader;
pub mod media;
pub mod prepare;
pub mod template;
pub mod validate;
pub mod video;

pub use conversation::{Conversation, DecodedMedia, Part, Role, Turn, VideoClip};
pub use image::RgbImage;
