//! The B-LoRA heat map: learned rank and bits per layer × module kind (PNG and SVG).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{plot_err, register_fonts};
use crate::adapters::blora::quantizer::Slot;
use crate::adapters::blora::LearnedLayer;
use crate::{atomic, Error, Result};

/// `(layer index, module kind)` from an HF module name: the first all-digit component and what
/// follows it (`encoder.layer.3.attention.self.query` → (3, `attention.self.query`)).
fn layer_and_kind(module: &str) -> (usize, String) {
    let parts: Vec<&str> = module.split('.').collect();
    match parts.iter().position(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit())) {
        Some(i) => (parts[i].parse().unwrap_or(0), parts[i + 1..].join(".")),
        None => (0, module.to_string()),
    }
}

/// Viridis at t ∈ [0, 1] (five anchors, linear in between).
fn viridis(t: f64) -> RGBColor {
    const ANCHORS: [(u8, u8, u8); 5] = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)];
    let x = t.clamp(0.0, 1.0) * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f64;
    let mix = |a: u8, b: u8| (f64::from(a) + (f64::from(b) - f64::from(a)) * f).round() as u8;
    let (a, b) = (ANCHORS[i], ANCHORS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// One panel: a title, and per (layer, kind) cell a value and its colour position in [0, 1].
struct Panel {
    title: String,
    cells: BTreeMap<(usize, usize), (String, f64)>,
}

fn panels(learned: &[(String, LearnedLayer)]) -> (Vec<usize>, Vec<String>, Vec<Panel>) {
    let mut layers: Vec<usize> = Vec::new();
    let mut kinds: Vec<String> = Vec::new();
    let mut pos = Vec::new();
    for (m, _) in learned {
        let (l, k) = layer_and_kind(m);
        if !layers.contains(&l) {
            layers.push(l);
        }
        if !kinds.contains(&k) {
            kinds.push(k.clone());
        }
        pos.push((l, k));
    }
    layers.sort_unstable();
    // Short kind labels (`query`) when the last name component is unique among the kinds.
    let short: Vec<String> = kinds.iter().map(|k| k.rsplit('.').next().unwrap_or(k).to_string()).collect();
    let unique = short.iter().all(|s| short.iter().filter(|t| *t == s).count() == 1);
    let index = |l: usize, k: &str| {
        (layers.iter().position(|&x| x == l).unwrap_or(0), kinds.iter().position(|x| x == k).unwrap_or(0))
    };
    let r_max = learned.iter().map(|(_, l)| l.r).max().unwrap_or(1).max(1);
    let mut out = vec![Panel { title: format!("learned rank (of {r_max})"), cells: BTreeMap::new() }];
    for ((_, l), (li, k)) in learned.iter().zip(&pos) {
        out[0].cells.insert(index(*li, k), (l.rank.to_string(), l.rank as f64 / r_max as f64));
    }
    for slot in Slot::ALL {
        if !learned.iter().any(|(_, l)| l.bits(slot).is_some()) {
            continue;
        }
        let mut p = Panel { title: format!("bits {}", slot.name()), cells: BTreeMap::new() };
        for ((_, l), (li, k)) in learned.iter().zip(&pos) {
            if let Some(b) = l.bits(slot) {
                p.cells.insert(index(*li, k), (b.to_string(), (f64::from(b).log2() - 1.0) / 4.0));
            }
        }
        out.push(p);
    }
    (layers, if unique { short } else { kinds }, out)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    layers: &[usize],
    kinds: &[String],
    panels: &[Panel],
    text: bool,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    root.fill(&WHITE)?;
    let body =
        if text { root.titled("B-LoRA: learned rank and bits per layer", ("sans-serif", 22))? } else { root.clone() };
    let areas = body.split_evenly((1, panels.len().max(1)));
    let (nc, nr) = (kinds.len() as f64, layers.len() as f64);
    let label = |h, v| ("sans-serif", 13).into_font().color(&BLACK).pos(Pos::new(h, v));
    for (area, panel) in areas.iter().zip(panels) {
        let mut builder = ChartBuilder::on(area);
        builder.margin(8).margin_left(if text { 56 } else { 8 }).margin_bottom(if text { 30 } else { 8 });
        if text {
            builder.caption(&panel.title, ("sans-serif", 16));
        }
        let mut chart = builder.build_cartesian_2d(0f64..nc, 0f64..nr)?;
        chart.draw_series(panel.cells.iter().map(|(&(r, c), (_, t))| {
            let (c, r) = (c as f64, r as f64);
            Rectangle::new([(c, r), (c + 1.0, r + 1.0)], viridis(*t).filled())
        }))?;
        if !text {
            continue;
        }
        chart.draw_series(panel.cells.iter().map(|(&(r, c), (value, t))| {
            let color: &'static RGBColor = if *t < 0.6 { &WHITE } else { &BLACK };
            Text::new(value.clone(), (c as f64 + 0.5, r as f64 + 0.5), label(HPos::Center, VPos::Center).color(color))
        }))?;
        // Axis labels in pixels, outside the plotting area: module kinds below, layers left.
        for (c, kind) in kinds.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(c as f64 + 0.5, 0.0));
            root.draw(&Text::new(kind.clone(), (x, y + 6), label(HPos::Center, VPos::Top)))?;
        }
        for (r, layer) in layers.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(0.0, r as f64 + 0.5));
            root.draw(&Text::new(format!("layer {layer}"), (x - 6, y), label(HPos::Right, VPos::Center)))?;
        }
    }
    root.present()?;
    Ok(())
}

/// Writes `<stem>.png` and `<stem>.svg`: one heat map per quantity (learned rank, then the bits
/// of each quantized tensor), layers × module kind, with the value in each cell; returns the
/// paths. Text falls back to none if the font fails, as the reliability diagrams do.
pub fn plot_learned(stem: &Path, learned: &[(String, LearnedLayer)]) -> Result<Vec<PathBuf>> {
    if learned.is_empty() {
        return Err(Error::config("layers", 0, "nothing to plot; attach B-LoRA first"));
    }
    register_fonts();
    let (layers, kinds, panels) = panels(learned);
    let longest = kinds.iter().map(|k| k.chars().count()).max().unwrap_or(1) as u32;
    let w = (kinds.len() as u32 * (longest * 8 + 16).max(56) + 80).max(220) * panels.len() as u32 + 20;
    let h = layers.len() as u32 * 36 + 130;
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    if let Some(dir) = png.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    // PNG: plotters writes the file itself; draw into a temporary name and rename.
    let tmp = stem.with_extension(format!("tmp{}.png", std::process::id()));
    let mut drawn = Err(plot_err(&png, "not drawn"));
    for text in [true, false] {
        drawn = {
            let root = BitMapBackend::new(&tmp, (w, h)).into_drawing_area();
            draw(&root, &layers, &kinds, &panels, text).map_err(|e| plot_err(&png, e))
        };
        match &drawn {
            Ok(()) => break,
            Err(e) if text => tracing::warn!("{e}; drawing the heat map without text"),
            Err(_) => {}
        }
    }
    if let Err(e) = drawn.and_then(|()| std::fs::rename(&tmp, &png).map_err(|e| Error::io(&png, e))) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let mut text_svg = String::new();
    for text in [true, false] {
        text_svg.clear();
        let result = {
            let root = SVGBackend::with_string(&mut text_svg, (w, h)).into_drawing_area();
            draw(&root, &layers, &kinds, &panels, text).map_err(|e| plot_err(&svg, e))
        };
        match result {
            Ok(()) => break,
            Err(e) if !text => return Err(e),
            Err(e) => tracing::warn!("{e}; drawing the heat map without text"),
        }
    }
    atomic::write(&svg, text_svg.as_bytes())?;
    Ok(vec![png, svg])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_split_into_layer_and_kind() {
        assert_eq!(layer_and_kind("encoder.layer.3.attention.self.query"), (3, "attention.self.query".into()));
        assert_eq!(layer_and_kind("model.layers.12.self_attn.q_proj"), (12, "self_attn.q_proj".into()));
        assert_eq!(layer_and_kind("q_proj"), (0, "q_proj".into()));
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(253, 231, 37));
    }
}
