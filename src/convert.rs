//! `lmms-ft convert LAYOUT`: writes a checkpoint of a foreign layout an adapter registers
//! (see [`lmms_ft_core::compose::LayoutEntry`]) as a standard Hugging Face
//! directory that `transformers` loads. The conversion is the one `train` / `evaluate` do in
//! memory: the layout's skeleton, the family's loader over it, then the weights saved.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use lmms_ft_core::compose::{self, MANIFEST};
use lmms_ft_core::config::ModelSettings;
use lmms_ft_core::family::{OpenOptions, ProcessorOptions};
use lmms_ft_core::peft::io::{save_hf_weights, SHARD_BYTES};
use tch::Device;

use crate::commands::{family_of_dir, saved_kind};

pub fn convert(layout: &str, model: &Path, settings: &ModelSettings, out: &Path) -> Result<()> {
    let entry = compose::layout(layout)?;
    ensure!(
        !out.exists()
            || std::fs::read_dir(out)
                .with_context(|| format!("listing {}", out.display()))?
                .next()
                .is_none(),
        "--out {} is not empty; converting writes a new directory",
        out.display()
    );
    (entry.skeleton)(model, settings, out)
        .with_context(|| format!("converting {} ({layout})", model.display()))?;
    let (family, json) = family_of_dir(out)?;
    let loaded = family.family.load_model(
        out,
        OpenOptions {
            device: Device::Cpu,
            kind: saved_kind(&json),
            processor: ProcessorOptions::default(),
        },
    )?;
    save_hf_weights(loaded.as_ref(), out, SHARD_BYTES)?;
    let manifest = out.join(MANIFEST);
    std::fs::remove_file(&manifest).with_context(|| format!("removing {}", manifest.display()))?;
    println!(
        "converted {} ({layout}); wrote {}",
        model.display(),
        out.display()
    );
    Ok(())
}
