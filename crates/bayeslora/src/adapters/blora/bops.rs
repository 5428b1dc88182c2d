//! Bit operations (BOPs) of the adapted layers: the trained B-LoRA at its learned ranks and bits
//! against LoRA of the same initial rank at fp32 and bf16 (`specs/blora.md` "BOPs").
//!
//! Per matmul, BOPs = MACs × bits(activation) × bits(weight) (Bayesian Bits' `print_bitops`).
//! Per token of one adapted layer (in → out, rank r′):
//!
//! ```text
//! base     in·out · b_x · b_W0
//! adapter  in·r′ · b_x · b_A  +  r′ · b_actA · b_E  +  r′·out · b_actE · b_B
//! LoRA     in·r · p · p  +  r·out · p · p          (base in·out · p · p)
//! ```
//!
//! Tensors that are not quantized count `precision` bits (32 for an fp32 model, 16 for bf16).
//! [`BopsReport::assumptions`] states all of this in the report itself.
use std::collections::BTreeMap;

use super::layer::LearnedLayer;
use super::quantizer::Slot;
use crate::{Error, Result};

/// BOPs of the base matmul and of the adapter matmuls.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Bops {
    pub base: f64,
    pub adapter: f64,
}

impl Bops {
    pub fn total(&self) -> f64 {
        self.base + self.adapter
    }

    fn scaled(self, k: f64) -> Bops {
        Bops { base: self.base * k, adapter: self.adapter * k }
    }

    fn add(self, o: Bops) -> Bops {
        Bops { base: self.base + o.base, adapter: self.adapter + o.adapter }
    }
}

/// One adapted layer, per token.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BopsRow {
    pub module: String,
    pub in_features: usize,
    pub out_features: usize,
    /// Initial rank.
    pub r: usize,
    /// Learned rank.
    pub rank: usize,
    /// Learned bits of every quantized tensor.
    pub bits: BTreeMap<Slot, u32>,
    pub blora: Bops,
    /// LoRA of rank r at `precision` bits.
    pub lora: Bops,
    pub lora_fp32: Bops,
    pub lora_bf16: Bops,
}

/// Sums over the layers, times `tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BopsTotals {
    pub blora: Bops,
    /// LoRA of the same initial rank at `precision` bits: the headline's reference.
    pub lora: Bops,
    pub lora_fp32: Bops,
    pub lora_bf16: Bops,
}

/// The BOPs report: rows per layer (per token), totals, ratios and the counting assumptions.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BopsReport {
    /// Bits counted for tensors that are not quantized (the model's compute precision).
    pub precision: u32,
    /// The multiplier of the totals (1: per token).
    pub tokens: f64,
    pub rows: Vec<BopsRow>,
    pub totals: BopsTotals,
    /// Headline: B-LoRA total / LoRA total, same initial rank, base at the same precision.
    pub ratio: f64,
    /// Adapter matmuls only: B-LoRA adapter / LoRA adapter (the base dominates unless quantized).
    pub adapter_ratio: f64,
    /// 100·(1 − ratio).
    pub reduction_percent: f64,
    /// 100·(1 − adapter_ratio).
    pub adapter_reduction_percent: f64,
    /// Every counting assumption, one per line.
    pub assumptions: Vec<String>,
}

/// One layer's B-LoRA BOPs per token at its learned rank and bits.
pub fn layer_bops(l: &LearnedLayer, precision: u32) -> Bops {
    let b = |s: Slot| f64::from(l.bits(s).unwrap_or(precision));
    let (i, o, r) = (l.in_features as f64, l.out_features as f64, l.rank as f64);
    Bops {
        base: i * o * b(Slot::Input) * b(Slot::Base),
        adapter: r
            * (i * b(Slot::Input) * b(Slot::LoraA)
                + b(Slot::ActA) * b(Slot::LoraE)
                + o * b(Slot::ActE) * b(Slot::LoraB)),
    }
}

/// LoRA `B·A` of rank `r` with every tensor at `bits`, per token.
pub fn lora_bops(in_features: usize, out_features: usize, r: usize, bits: u32) -> Bops {
    let (i, o, r, b) = (in_features as f64, out_features as f64, r as f64, f64::from(bits));
    Bops { base: i * o * b * b, adapter: r * (i + o) * b * b }
}

/// The report for learned layers ([`super::AttachedBLora::learned`]), unquantized tensors at
/// `precision` bits (32 or 16), totals × `tokens` (e.g. tokens per example × examples; 1 for
/// per token).
pub fn bops_report(learned: &[(String, LearnedLayer)], precision: u32, tokens: f64) -> Result<BopsReport> {
    if !(1..=64).contains(&precision) {
        return Err(Error::config("precision", precision, "bits of unquantized tensors: 32 (fp32) or 16 (bf16)"));
    }
    if !(tokens.is_finite() && tokens > 0.0) {
        return Err(Error::config("tokens", tokens, "must be a positive number (1 for per-token BOPs)"));
    }
    if learned.is_empty() {
        return Err(Error::config("layers", 0, "no adapted layer to count; attach B-LoRA first"));
    }
    let rows: Vec<BopsRow> = learned
        .iter()
        .map(|(m, l)| BopsRow {
            module: m.clone(),
            in_features: l.in_features,
            out_features: l.out_features,
            r: l.r,
            rank: l.rank,
            bits: l.bits.clone(),
            blora: layer_bops(l, precision),
            lora: lora_bops(l.in_features, l.out_features, l.r, precision),
            lora_fp32: lora_bops(l.in_features, l.out_features, l.r, 32),
            lora_bf16: lora_bops(l.in_features, l.out_features, l.r, 16),
        })
        .collect();
    let mut t = BopsTotals::default();
    for row in &rows {
        t.blora = t.blora.add(row.blora);
        t.lora = t.lora.add(row.lora);
        t.lora_fp32 = t.lora_fp32.add(row.lora_fp32);
        t.lora_bf16 = t.lora_bf16.add(row.lora_bf16);
    }
    let totals = BopsTotals {
        blora: t.blora.scaled(tokens),
        lora: t.lora.scaled(tokens),
        lora_fp32: t.lora_fp32.scaled(tokens),
        lora_bf16: t.lora_bf16.scaled(tokens),
    };
    let ratio = totals.blora.total() / totals.lora.total();
    let adapter_ratio = totals.blora.adapter / totals.lora.adapter;
    let base_quantized = learned.iter().any(|(_, l)| l.quantize_base);
    let assumptions = vec![
        "BOPs = MACs × bits(activation) × bits(weight) per matmul (Bayesian Bits, van Baalen et al. 2020)".into(),
        format!("rows are per token; totals are × {tokens} tokens"),
        "counted per adapted layer: the base x·W0ᵀ (in·out MACs) and the adapter's x·Aᵀ (in·r′), ·E \
         (r′, elementwise) and ·Bᵀ (r′·out); LoRA: x·Aᵀ (in·r) and ·Bᵀ (r·out)"
            .into(),
        "not counted: bias and residual adds, the adapter's scaling, attention, layer norms, unadapted \
         layers, embeddings and the head; act_B (the adapter output) feeds no counted matmul"
            .into(),
        format!(
            "tensors that are not quantized count {precision} bits{}",
            if base_quantized { "" } else { " (here the base W0 and the layer input x: quantize_base is off)" }
        ),
        "B-LoRA ranks and bits come from the deterministic test-time gates (P(z > 0) > 0.66)".into(),
        format!(
            "headline ratio = B-LoRA total / LoRA total with the same initial rank and every tensor at \
             {precision} bits (base at the same precision); adapter ratio = the adapter matmuls only"
        ),
    ];
    Ok(BopsReport {
        precision,
        tokens,
        rows,
        totals,
        ratio,
        adapter_ratio,
        reduction_percent: 100.0 * (1.0 - ratio),
        adapter_reduction_percent: 100.0 * (1.0 - adapter_ratio),
        assumptions,
    })
}

/// `1.23 G` style.
fn human(v: f64) -> String {
    let (div, unit) = match v.abs() {
        a if a >= 1e12 => (1e12, " T"),
        a if a >= 1e9 => (1e9, " G"),
        a if a >= 1e6 => (1e6, " M"),
        a if a >= 1e3 => (1e3, " k"),
        _ => (1.0, ""),
    };
    format!("{:.3}{unit}", v / div)
}

fn bits_cell(row: &BopsRow, slots: &[Slot]) -> String {
    slots.iter().map(|s| row.bits.get(s).map_or("-".to_string(), |b| b.to_string())).collect::<Vec<_>>().join("/")
}

/// The report as a terminal table: one row per layer, the totals, the ratios and the assumptions.
pub fn render_table(report: &BopsReport) -> String {
    let p = report.precision;
    let header = [
        "module".to_string(),
        "in×out".into(),
        "r→r′".into(),
        "bits A/E/B".into(),
        "act A/E/B".into(),
        "x/W0".into(),
        "adapter BOPs".into(),
        format!("LoRA{p} adapter"),
        "ratio".into(),
    ];
    let mut rows: Vec<[String; 9]> = vec![header];
    for r in &report.rows {
        rows.push([
            r.module.clone(),
            format!("{}×{}", r.in_features, r.out_features),
            format!("{}→{}", r.r, r.rank),
            bits_cell(r, &[Slot::LoraA, Slot::LoraE, Slot::LoraB]),
            bits_cell(r, &[Slot::ActA, Slot::ActE, Slot::ActB]),
            bits_cell(r, &[Slot::Input, Slot::Base]),
            human(r.blora.adapter),
            human(r.lora.adapter),
            format!("{:.4}", r.blora.adapter / r.lora.adapter),
        ]);
    }
    let widths: Vec<usize> = (0..9).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (k, r) in rows.iter().enumerate() {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (v, w))| {
                let pad = w - v.chars().count();
                if c == 0 {
                    format!("{v}{}", " ".repeat(pad))
                } else {
                    format!("{}{v}", " ".repeat(pad))
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if k == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&rule.join("  "));
            out.push('\n');
        }
    }
    let t = &report.totals;
    let per = if report.tokens == 1.0 { "per token".to_string() } else { format!("× {} tokens", report.tokens) };
    out.push_str(&format!("\n{:<24} {:>12}  {:>12}  {:>12}\n", format!("totals ({per})"), "base", "adapter", "total"));
    for (name, b) in [
        ("B-LoRA (learned)".to_string(), t.blora),
        (format!("LoRA r, {p}-bit"), t.lora),
        ("LoRA r, fp32".into(), t.lora_fp32),
        ("LoRA r, bf16".into(), t.lora_bf16),
    ] {
        out.push_str(&format!(
            "  {name:<22} {:>12}  {:>12}  {:>12}\n",
            human(b.base),
            human(b.adapter),
            human(b.total())
        ));
    }
    out.push_str(&format!(
        "\nB-LoRA / LoRA ({p}-bit base): {:.4} of the BOPs ({:.1}% fewer); adapter only: {:.4} ({:.1}% fewer)\n",
        report.ratio, report.reduction_percent, report.adapter_ratio, report.adapter_reduction_percent
    ));
    out.push_str("\nassumptions:\n");
    for a in &report.assumptions {
        out.push_str(&format!("  - {a}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn learned(bits: &[(Slot, u32)], rank: usize, quantize_base: bool) -> LearnedLayer {
        LearnedLayer {
            in_features: 8,
            out_features: 6,
            r: 4,
            rank,
            bits: bits.iter().copied().collect(),
            quantize_base,
        }
    }

    #[test]
    fn hand_computed_layer() -> Result<()> {
        // in 8, out 6, r 4 → r′ 2; A 4 bits, E 8, B 2, act_A 8, act_E 16, act_B 4; x, W0 at 32.
        let l = learned(
            &[(Slot::LoraA, 4), (Slot::LoraE, 8), (Slot::LoraB, 2), (Slot::ActA, 8), (Slot::ActE, 16), (Slot::ActB, 4)],
            2,
            false,
        );
        let b = layer_bops(&l, 32);
        assert_eq!(b.base, 8.0 * 6.0 * 32.0 * 32.0);
        // 2·(8·32·4 + 8·8 + 6·16·2) = 2·(1024 + 64 + 192) = 2560
        assert_eq!(b.adapter, 2560.0);
        // LoRA r 4 fp32: 4·(8 + 6)·1024 = 57344; bf16: 4·14·256 = 14336.
        assert_eq!(lora_bops(8, 6, 4, 32).adapter, 57344.0);
        assert_eq!(lora_bops(8, 6, 4, 16), Bops { base: 8.0 * 6.0 * 256.0, adapter: 14336.0 });
        let rep = bops_report(&[("q".into(), l.clone()), ("v".into(), l)], 32, 10.0)?;
        assert_eq!(rep.totals.blora.adapter, 2.0 * 2560.0 * 10.0);
        assert_eq!(rep.totals.lora.total(), 2.0 * 10.0 * (49152.0 + 57344.0));
        assert!((rep.adapter_ratio - 2560.0 / 57344.0).abs() < 1e-12);
        assert!((rep.ratio - (49152.0 + 2560.0) / (49152.0 + 57344.0)).abs() < 1e-12);
        assert!((rep.reduction_percent - 100.0 * (1.0 - rep.ratio)).abs() < 1e-9);
        let table = render_table(&rep);
        println!("{table}");
        assert!(table.contains("4→2") && table.contains("4/8/2") && table.contains("8/16/4"), "{table}");
        assert!(table.contains("assumptions") && table.contains("× 10 tokens"), "{table}");
        let json = serde_json::to_string(&rep).map_err(|e| Error::config("json", "", e.to_string()))?;
        assert!(json.contains("\"lora_A\":4"), "{json}");
        let back: BopsReport = serde_json::from_str(&json).map_err(|e| Error::config("json", "", e.to_string()))?;
        // serde_json's default float parsing may differ in the last digit: compare the exact parts.
        assert_eq!((back.rows, back.totals), (rep.rows.clone(), rep.totals));
        assert!((back.ratio - rep.ratio).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn quantized_base_counts_its_bits() -> Result<()> {
        let l = learned(&[(Slot::Input, 8), (Slot::Base, 4), (Slot::LoraA, 32)], 4, true);
        let b = layer_bops(&l, 16);
        assert_eq!(b.base, 8.0 * 6.0 * 8.0 * 4.0);
        // A at 32 with x at 8; E, B and activations at the 16-bit precision.
        assert_eq!(b.adapter, 4.0 * (8.0 * 8.0 * 32.0 + 16.0 * 16.0 + 6.0 * 16.0 * 16.0));
        let rep = bops_report(&[("q".into(), l)], 16, 1.0)?;
        assert_eq!(rep.totals.lora, rep.totals.lora_bf16);
        assert!(bops_report(&[], 32, 1.0).is_err());
        assert!(bops_report(&rep_layers(), 0, 1.0).is_err());
        Ok(())
    }

    fn rep_layers() -> Vec<(String, LearnedLayer)> {
        vec![("q".into(), learned(&[], 4, false))]
    }
}
