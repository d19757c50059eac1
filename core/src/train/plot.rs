//! `loss.png`: train and eval loss against the optimiser step, drawn from `metrics.jsonl`.
//!
//! Rendered with `plotters` into an RGB buffer and encoded with the `image` crate; the font
//! (DejaVu Sans) is compiled in, so the plot looks the same on machines without fonts.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 540;

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TTF shipped by the `dejavu` crate; if registration failed
        // anyway, text would be missing, which the draw calls report.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// The (step, loss) series of a metrics file: train rows and eval rows.
pub type Series = Vec<(f64, f64)>;

/// Train and eval loss series from metrics rows.
pub fn series(rows: &[serde_json::Value]) -> (Series, Series) {
    let pick = |key: &str| -> Series {
        rows.iter()
            .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
            .filter(|(_, v)| v.is_finite())
            .collect()
    };
    (pick("loss"), pick("eval_loss"))
}

/// Draws the curves into `path` (PNG).
pub fn plot_losses(train: &[(f64, f64)], eval: &[(f64, f64)], path: &Path) -> Result<()> {
    if train.is_empty() && eval.is_empty() {
        bail!("no loss values to plot");
    }
    register_font();
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    draw(train, eval, &mut buf).map_err(|e| anyhow!("drawing the loss plot: {e}"))?;
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf)
        .context("the loss plot buffer has the wrong size")?;
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn draw(
    train: &[(f64, f64)],
    eval: &[(f64, f64)],
    buf: &mut [u8],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(buf, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let all = train.iter().chain(eval);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(&root)
        .caption("loss", ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .label_style(("sans-serif", 15))
        .draw()?;
    if !train.is_empty() {
        chart
            .draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    }
    if !eval.is_empty() {
        chart
            .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)))?
            .label("eval")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart.draw_series(
            eval.iter()
                .map(|&(x, y)| Circle::new((x, y), 4, RED.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()?;
    Ok(())
}
