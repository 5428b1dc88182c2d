//! Reliability diagrams (PNG and SVG) with plotters: one panel per method, bars of per-bin
//! accuracy against the diagonal, the gap to the bin's mean confidence outlined in red, the
//! count printed above each bar, and the ECE in the panel title.
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::{Error, Result};

use super::{plot_err, register_fonts};
use crate::eval::metrics::{Binning, ReliabilityBins};

/// One panel of a reliability figure.
#[derive(Debug, Clone)]
pub struct Panel<'a> {
    /// Method name, e.g. "IVON (K=10)".
    pub name: &'a str,
    pub bins: &'a ReliabilityBins,
}

/// Bars to draw: torchmetrics' extra conf = 1.0 bin is folded into the last bin for display.
fn display_bins(b: &ReliabilityBins) -> Vec<(f64, f64, usize, f64, f64)> {
    let n = b.n_bins;
    let mut out: Vec<(f64, f64, usize, f64, f64)> =
        (0..n).map(|i| (b.edges[i], b.edges[i + 1], b.count[i], b.accuracy[i], b.confidence[i])).collect();
    if b.binning == Binning::Torchmetrics && b.count.len() > n && b.count[n] > 0 {
        if let Some(last) = out.last_mut() {
            let (c0, c1) = (last.2 as f64, b.count[n] as f64);
            last.3 = (last.3 * c0 + b.accuracy[n] * c1) / (c0 + c1);
            last.4 = (last.4 * c0 + b.confidence[n] * c1) / (c0 + c1);
            last.2 += b.count[n];
        }
    }
    out
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    panels: &[Panel<'_>],
    text: bool,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let body = if text { root.titled(title, ("sans-serif", 24))? } else { root.clone() };
    let areas = body.split_evenly((1, panels.len().max(1)));
    for (area, panel) in areas.iter().zip(panels) {
        let ece = panel.bins.ece() * 100.0;
        let mut builder = ChartBuilder::on(area);
        builder.margin(12);
        if text {
            builder
                .caption(format!("{}  ECE {:.2}% ({} bins)", panel.name, ece, panel.bins.n_bins), ("sans-serif", 18))
                .x_label_area_size(40)
                .y_label_area_size(50);
        }
        let mut chart = builder.build_cartesian_2d(0f64..1f64, 0f64..1.08f64)?;
        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(WHITE.mix(0.0));
        if text {
            mesh.x_desc("confidence").y_desc("accuracy").label_style(("sans-serif", 14));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw()?;
        let bars = display_bins(panel.bins);
        let (bar_colour, gap_colour) = (RGBColor(66, 114, 196).mix(0.85), RED.mix(0.35));
        let swatch = |c: RGBAColor| move |(x, y): (i32, i32)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled());
        // accuracy bars
        chart
            .draw_series(
                bars.iter()
                    .filter(|b| b.2 > 0)
                    .map(|&(lo, hi, _, acc, _)| Rectangle::new([(lo, 0.0), (hi, acc)], bar_colour.filled())),
            )?
            .label("accuracy of the bin")
            .legend(swatch(bar_colour));
        // gap between accuracy and mean confidence
        chart
            .draw_series(bars.iter().filter(|b| b.2 > 0).map(|&(lo, hi, _, acc, conf)| {
                Rectangle::new([(lo, acc.min(conf)), (hi, acc.max(conf))], gap_colour.filled())
            }))?
            .label("gap to the bin's mean confidence")
            .legend(swatch(gap_colour));
        chart.draw_series(
            bars.iter().map(|&(lo, hi, _, _, _)| Rectangle::new([(lo, 0.0), (hi, 0.0)], BLACK.stroke_width(1))),
        )?;
        chart
            .draw_series(LineSeries::new(vec![(0.0, 0.0), (1.0, 1.0)], BLACK.stroke_width(2)))?
            .label("perfect calibration")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], BLACK.stroke_width(2)));
        if text {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 12))
                .draw()?;
            chart.draw_series(bars.iter().filter(|b| b.2 > 0).map(|&(lo, hi, n, acc, conf)| {
                Text::new(
                    n.to_string(),
                    ((lo + hi) / 2.0 - 0.02, acc.max(conf) + 0.05),
                    ("sans-serif", 12).into_font().color(&BLACK),
                )
            }))?;
        }
    }
    root.present()?;
    Ok(())
}

/// Writes `<stem>.png` and `<stem>.svg`; returns their paths.
pub fn reliability_diagram(stem: &Path, title: &str, panels: &[Panel<'_>]) -> Result<Vec<PathBuf>> {
    if panels.is_empty() {
        return Err(Error::config("panels", 0, "give at least one method to plot"));
    }
    register_fonts();
    let (w, h) = (460 * panels.len() as u32 + 40, 500u32);
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    if let Some(dir) = png.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    for text in [true, false] {
        let result = {
            let root = BitMapBackend::new(&png, (w, h)).into_drawing_area();
            draw(&root, title, panels, text).map_err(|e| plot_err(&png, e))
        };
        match result {
            Ok(()) => break,
            Err(e) if !text => return Err(e),
            Err(e) => tracing::warn!("{e}; drawing the reliability diagram without text (no usable system font?)"),
        }
    }
    for text in [true, false] {
        let result = {
            let root = SVGBackend::new(&svg, (w, h)).into_drawing_area();
            draw(&root, title, panels, text).map_err(|e| plot_err(&svg, e))
        };
        match result {
            Ok(()) => break,
            Err(e) if !text => return Err(e),
            Err(e) => tracing::warn!("{e}; drawing the reliability diagram without text"),
        }
    }
    Ok(vec![png, svg])
}
