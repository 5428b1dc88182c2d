//! K curves (PNG and SVG): accuracy and ECE-15 against the number of posterior samples K, one
//! line per method.
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;

use super::{plot_err, register_fonts};
use crate::{Error, Result};

/// Accuracy and ECE-15 against K for one method on one task, averaged over seeds (only the K
/// that every seed reports).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KCurve {
    pub method: String,
    /// (K, mean accuracy, mean ECE-15), K ascending.
    pub points: Vec<(usize, f64, f64)>,
}

fn draw_k<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    curves: &[KCurve],
    text: bool,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let body = if text { root.titled(title, ("sans-serif", 22))? } else { root.clone() };
    let areas = body.split_evenly((1, 2));
    let max_k = curves.iter().flat_map(|c| c.points.iter().map(|p| p.0)).max().unwrap_or(1).max(1);
    for (panel, area) in areas.iter().enumerate() {
        let value = |p: &(usize, f64, f64)| if panel == 0 { p.1 * 100.0 } else { p.2 * 100.0 };
        let vals: Vec<f64> = curves.iter().flat_map(|c| c.points.iter().map(value)).collect();
        let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        let pad = ((hi - lo) * 0.1).max(0.5);
        let mut builder = ChartBuilder::on(area);
        builder.margin(14);
        if text {
            builder
                .caption(if panel == 0 { "accuracy (%)" } else { "ECE-15 (%)" }, ("sans-serif", 18))
                .x_label_area_size(35)
                .y_label_area_size(50);
        }
        let mut chart = builder.build_cartesian_2d(0f64..max_k as f64 + 0.5, (lo - pad)..(hi + pad))?;
        if text {
            chart.configure_mesh().x_desc("K (posterior samples / passes / members)").draw()?;
        }
        for (i, c) in curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> = if c.points.len() == 1 {
                // a single K (temperature scaling, AdamW): a flat reference line
                let v = value(&c.points[0]);
                vec![(0.0, v), (max_k as f64, v)]
            } else {
                c.points.iter().map(|p| (p.0 as f64, value(p))).collect()
            };
            let series = chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?;
            if text {
                series
                    .label(c.method.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            }
            if c.points.len() > 1 {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
            }
        }
        if text && panel == 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}

/// Writes `<stem>.png` and `<stem>.svg`: accuracy and ECE-15 against K, one line per method (a
/// method evaluated at one K only is drawn as a flat reference line).
pub fn k_curve_plot(stem: &Path, title: &str, curves: &[KCurve]) -> Result<Vec<PathBuf>> {
    if curves.is_empty() {
        return Err(Error::config("curves", 0, "give at least one method to plot"));
    }
    register_fonts();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    if let Some(dir) = png.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let (w, h) = (1100u32, 480u32);
    for text in [true, false] {
        let r = draw_k(&BitMapBackend::new(&png, (w, h)).into_drawing_area(), title, curves, text)
            .map_err(|e| plot_err(&png, e));
        match r {
            Ok(()) => break,
            Err(e) if !text => return Err(e),
            Err(e) => tracing::warn!("{e}; drawing the K curves without text (no usable system font?)"),
        }
    }
    for text in [true, false] {
        let r = draw_k(&SVGBackend::new(&svg, (w, h)).into_drawing_area(), title, curves, text)
            .map_err(|e| plot_err(&svg, e));
        match r {
            Ok(()) => break,
            Err(e) if !text => return Err(e),
            Err(e) => tracing::warn!("{e}; drawing the K curves without text"),
        }
    }
    Ok(vec![png, svg])
}
