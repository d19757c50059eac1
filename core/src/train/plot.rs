//! `loss.png`: train and eval loss against the optimiser step, drawn from `metrics.jsonl`:
//! the raw train loss faint with a smoothed curve over it (per-step loss is noisy), eval loss
//! with markers, and, when answers were generated at evaluation, their ROUGE-L on a second
//! axis (0 to 1) on the right.
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

/// ROUGE-L of the answers generated at each evaluation (`train.eval_generate_samples`).
pub fn generation_series(rows: &[serde_json::Value]) -> Series {
    rows.iter()
        .filter_map(|r| Some((r["step"].as_f64()?, r["eval_rouge_l"].as_f64()?)))
        .filter(|(_, v)| v.is_finite())
        .collect()
}

/// Exponential moving average with TensorBoard's debiasing (weight `SMOOTHING` on the
/// past), so the first points are not pulled towards 0.
pub fn smoothed(series: &[(f64, f64)]) -> Series {
    let mut avg = 0.0;
    let mut weight = 0.0;
    series
        .iter()
        .map(|&(x, y)| {
            avg = SMOOTHING * avg + (1.0 - SMOOTHING) * y;
            weight = SMOOTHING * weight + (1.0 - SMOOTHING);
            (x, avg / weight)
        })
        .collect()
}

const SMOOTHING: f64 = 0.8;

/// Draws the loss curves into `path` (PNG).
pub fn plot_losses(train: &[(f64, f64)], eval: &[(f64, f64)], path: &Path) -> Result<()> {
    plot_curves(train, eval, &[], path)
}

/// Draws the loss curves and the generation metric (may be empty) into `path` (PNG).
pub fn plot_curves(
    train: &[(f64, f64)],
    eval: &[(f64, f64)],
    metric: &[(f64, f64)],
    path: &Path,
) -> Result<()> {
    if train.is_empty() && eval.is_empty() {
        bail!("no loss values to plot");
    }
    register_font();
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    draw(train, eval, metric, &mut buf).map_err(|e| anyhow!("drawing the loss plot: {e}"))?;
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf)
        .context("the loss plot buffer has the wrong size")?;
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The metric's colour (green), distinct from the train (blue) and eval (red) curves.
pub const METRIC_COLOR: RGBColor = RGBColor(0, 150, 60);

fn draw(
    train: &[(f64, f64)],
    eval: &[(f64, f64)],
    metric: &[(f64, f64)],
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
    for &(x, _) in metric {
        x0 = x0.min(x);
        x1 = x1.max(x);
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
        .right_y_label_area_size(if metric.is_empty() { 0 } else { 64 })
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?
        .set_secondary_coord(x0..x1, 0.0..1.0);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .label_style(("sans-serif", 15))
        .draw()?;
    if !train.is_empty() {
        let faint = BLUE.mix(0.3);
        chart
            .draw_series(LineSeries::new(
                train.iter().copied(),
                faint.stroke_width(1),
            ))?
            .label("train")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], faint.stroke_width(1))
            });
        chart
            .draw_series(LineSeries::new(smoothed(train), BLUE.stroke_width(2)))?
            .label("train (smoothed)")
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
    if !metric.is_empty() {
        chart
            .configure_secondary_axes()
            .y_desc("eval ROUGE-L")
            .label_style(("sans-serif", 15))
            .draw()?;
        chart
            .draw_secondary_series(LineSeries::new(
                metric.iter().copied(),
                METRIC_COLOR.stroke_width(2),
            ))?
            .label("eval ROUGE-L (right)")
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], METRIC_COLOR.stroke_width(2))
            });
        chart.draw_secondary_series(
            metric
                .iter()
                .map(|&(x, y)| TriangleMarker::new((x, y), 5, METRIC_COLOR.filled())),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Debiased EMA worked by hand: 1 → 1; (0.8·0.2·1 + 0.2·3) / (1 − 0.8²) = 0.76 / 0.36.
    #[test]
    fn smoothing_is_a_debiased_moving_average() {
        let s = smoothed(&[(1.0, 1.0), (2.0, 3.0)]);
        assert!((s[0].1 - 1.0).abs() < 1e-12);
        assert!((s[1].1 - 0.76 / 0.36).abs() < 1e-12);
        let flat = smoothed(&[(1.0, 2.0), (2.0, 2.0), (3.0, 2.0)]);
        assert!(flat.iter().all(|&(_, y)| (y - 2.0).abs() < 1e-12));
    }

    fn green_pixels(metric: &[(f64, f64)]) -> usize {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("loss.png");
        let train: Vec<(f64, f64)> = (1..=20).map(|s| (s as f64, 3.0 - s as f64 * 0.1)).collect();
        plot_curves(&train, &[(10.0, 2.2), (20.0, 1.4)], metric, &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        img.pixels()
            .filter(|p| p[1] > 120 && p[0] < 40 && p[2] < 90)
            .count()
    }

    /// The generation metric is drawn when given, and nothing green otherwise.
    #[test]
    fn the_generation_metric_is_drawn_when_present() {
        assert_eq!(green_pixels(&[]), 0);
        assert!(green_pixels(&[(10.0, 0.2), (20.0, 0.5)]) > 100);
    }
}
