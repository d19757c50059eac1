//! From a dataset record to what a model family consumes: the conversation plus its decoded
//! images and sampled video frames, with the dataset's media options applied.

use anyhow::{Context, Result};

use crate::config::DataSection;
use crate::data::dataset::{DatasetOptions, Record};
use crate::data::media::{load_image, ImageLimits};
use crate::data::video::{load_video, FrameSelection, VideoSampling};
use crate::data::DecodedMedia;
use crate::family::PreparedConversation;

/// How media of a record are decoded.
#[derive(Debug, Clone)]
pub struct MediaOptions {
    pub image_limits: ImageLimits,
    pub video: VideoSampling,
}

impl MediaOptions {
    pub fn from_config(data: &DataSection) -> Self {
        let selection = match data.video_num_frames {
            Some(num_frames) => FrameSelection::Uniform { num_frames },
            None => FrameSelection::Fps {
                fps: data.video_fps,
                min_frames: data.video_min_frames,
                max_frames: data.video_max_frames,
            },
        };
        MediaOptions {
            image_limits: ImageLimits {
                max_pixels: data.max_image_pixels,
            },
            video: VideoSampling {
                selection,
                ..VideoSampling::default()
            },
        }
    }
}

impl Default for MediaOptions {
    fn default() -> Self {
        MediaOptions::from_config(&DataSection::default())
    }
}

/// Dataset reading options (folders) from the data section.
pub fn dataset_options(data: &DataSection) -> DatasetOptions {
    DatasetOptions {
        image_folder: data.image_folder.clone(),
        video_folder: data.video_folder.clone(),
        ..DatasetOptions::default()
    }
}

/// Decodes every image and video of `record`; errors name the record and the file.
pub fn prepare(record: &Record, opts: &MediaOptions) -> Result<PreparedConversation> {
    let mut media = DecodedMedia::default();
    for path in &record.images {
        media.images.push(
            load_image(path, &opts.image_limits)
                .with_context(|| format!("sample at {}", record.location))?,
        );
    }
    for path in &record.videos {
        media.videos.push(
            load_video(path, &opts.video)
                .with_context(|| format!("sample at {}", record.location))?,
        );
    }
    Ok(PreparedConversation {
        conversation: record.conversation.clone(),
        media,
    })
}
