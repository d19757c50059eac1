//! Loading + collation throughput of a generated 1,000-sample image dataset: decode (PNG and
//! JPEG of mixed sizes), Qwen2-VL processing (smart_resize, PIL bicubic, patchify), chat
//! template + label mask, collation to padded batches with M-RoPE positions, in the
//! background loader. Prints samples/s for 1 worker and for `--workers N`.
//!
//! `cargo run --release --example data_throughput -- MODEL_DIR [--samples 1000] [--workers 2]`
//! where MODEL_DIR holds a Qwen2-VL tokenizer/template/processor config (e.g. the fixture that
//! `scripts/oracle/qwen2_vl_fixture.py` writes).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use image::{ImageBuffer, Rgb};
use lmms_ft_core::data::dataset::Dataset;
use lmms_ft_core::data::loader::{Loader, LoaderOptions};
use lmms_ft_core::data::prepare::{prepare, MediaOptions};
use lmms_ft_core::family::{ChatTemplate, Collator, Family, Processor};
use lmms_ft_qwen2_vl::family::Qwen2Vl;
use tch::Device;

fn make_dataset(dir: &Path, n: usize) -> Result<PathBuf> {
    let sizes = [(640u32, 480u32), (500, 333), (224, 224), (1024, 768)];
    let mut records = Vec::with_capacity(n);
    for (i, &(w, h)) in sizes.iter().enumerate() {
        // A smooth gradient with noise compresses like a photo.
        let img = ImageBuffer::from_fn(w, h, |x, y| {
            let n = ((x * 7 + y * 13 + i as u32 * 31) % 17) as u8;
            Rgb([
                (x * 255 / w) as u8 ^ n,
                (y * 255 / h) as u8,
                (((x + y) * 3) % 256) as u8,
            ])
        });
        img.save(dir.join(format!("img{i}.png")))?;
        img.save(dir.join(format!("img{i}.jpg")))?;
    }
    for i in 0..n {
        let ext = if i % 2 == 0 { "jpg" } else { "png" };
        records.push(serde_json::json!({
            "image": format!("img{}.{ext}", i % sizes.len()),
            "conversations": [
                {"from": "human", "value": format!("<image>\nWhat is in picture {i}?")},
                {"from": "gpt", "value": "A colourful gradient with a faint diagonal pattern."}
            ]
        }));
    }
    let path = dir.join("data.json");
    std::fs::write(&path, serde_json::to_string(&records)?)?;
    Ok(path)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model_dir = PathBuf::from(
        args.get(1)
            .context("usage: data_throughput MODEL_DIR [--samples N] [--workers N]")?,
    );
    let flag = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let n = flag("--samples", 1000);
    let workers = flag("--workers", 2);
    let batch_size = 8;
    let tmp = tempfile::tempdir()?;
    let data = make_dataset(tmp.path(), n)?;

    let config = Qwen2Vl::config(&model_dir)?;
    let processor = Arc::new(Qwen2Vl::processor(
        &config,
        &model_dir,
        &Default::default(),
    )?);
    let template = Arc::new(Qwen2Vl::template(&config, &model_dir)?);
    let collator = Arc::new(Qwen2Vl::collator(&config));
    let dataset = Arc::new(Dataset::open(&data, Default::default())?);
    let media = Arc::new(MediaOptions::default());
    for w in [1, workers] {
        let (p, t, c, d, m) = (
            processor.clone(),
            template.clone(),
            collator.clone(),
            dataset.clone(),
            media.clone(),
        );
        let load = move |indices: &[usize]| {
            let mut samples = Vec::with_capacity(indices.len());
            for &i in indices {
                let record = d.get(i).context("index out of range")??;
                let prepared = prepare(&record, &m)?;
                let (media, tokens) = p.process(&prepared.media.images, &prepared.media.videos)?;
                let text = t.encode(&prepared.conversation, &tokens, false)?;
                samples.push(Qwen2Vl::sample(text, media));
            }
            c.collate(samples, Device::Cpu)
        };
        let batches: Vec<Vec<usize>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        let start = Instant::now();
        let mut tokens = 0i64;
        for batch in Loader::new(
            batches,
            load,
            LoaderOptions {
                workers: w,
                prefetch: 2 * w,
            },
        )? {
            tokens += batch?.input_ids.numel() as i64;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "workers {w}: {n} samples in {secs:.2} s = {:.1} samples/s ({tokens} padded tokens, batch {batch_size})",
            n as f64 / secs
        );
    }
    Ok(())
}
