//! Every figure the library draws, in one place (plotters; PNG and SVG side by side):
//! reliability diagrams ([`reliability_diagram`]), K curves ([`k_curve_plot`]) and the B-LoRA
//! heat map of learned ranks and bits ([`plot_learned`]). Callers (the sweep summary, the CLI)
//! pass plain results in; nothing here computes a metric.
//!
//! Text uses DejaVu Sans, bundled in the binary (`assets/DejaVuSans.ttf`, free licence in
//! `assets/DejaVuSans.LICENSE`) and registered as "sans-serif", so plots need no system fonts or
//! fontconfig. Should text still fail, a figure is drawn again without text rather than failing.
mod k_curve;
mod learned;
mod reliability;

use std::path::Path;

use plotters::style::FontStyle;

use crate::Error;

pub use k_curve::{k_curve_plot, KCurve};
pub use learned::plot_learned;
pub use reliability::{reliability_diagram, Panel};

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io { path: path.to_path_buf(), cause: std::io::Error::other(format!("drawing the plot failed: {e}")) }
}

/// Registers the bundled DejaVu Sans as "sans-serif" (once per process).
fn register_fonts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../assets/DejaVuSans.ttf");
        if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_err() {
            tracing::warn!("the bundled font could not be read; plots will have no text");
        }
    });
}
