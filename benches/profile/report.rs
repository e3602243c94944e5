//! The report: one row per (loss, device, dtype, pass), as a table, as JSON, as a Markdown
//! table and as a PNG chart; and the comparison with an earlier report.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::chart;

/// One line of the table and one object of the JSON report.
#[derive(Debug, Serialize)]
pub struct Row {
    pub loss: String,
    pub device: String,
    pub dtype: &'static str,
    pub shape: String,
    pub n: i64,
    pub c: i64,
    pub pass: &'static str,
    /// Medians.
    pub fused_ms: f64,
    pub unfused_ms: f64,
    /// The fastest repetitions.
    pub fused_min_ms: f64,
    pub unfused_min_ms: f64,
    /// Interquartile range over median of the repetitions (see `timing::Timing::spread`).
    pub fused_spread: f64,
    pub unfused_spread: f64,
    /// MMDetection's Python loss in PyTorch eager and under torch.compile (`--pytorch`,
    /// forward+backward rows on the CPU).
    pub pytorch_eager_ms: Option<f64>,
    pub pytorch_compiled_ms: Option<f64>,
    /// unfused_ms / fused_ms.
    pub speedup: f64,
    /// Largest |fused - unfused| over the loss (forward) or the gradient (backward rows).
    pub max_abs_diff: f64,
    /// Largest |unfused| over the same values: the scale `max_abs_diff` compares against.
    pub unfused_max_abs: f64,
    pub warmup: usize,
    pub reps: usize,
    /// Least bytes the fused pass moves (CUDA rows only).
    pub fused_bytes: Option<u64>,
    pub fused_gbps: Option<f64>,
    pub copy_gbps: Option<f64>,
    pub fused_pct_of_copy: Option<f64>,
    /// Not measurable through tch yet (see the module documentation): always null.
    pub fused_peak_bytes: Option<u64>,
    pub unfused_peak_bytes: Option<u64>,
    pub crate_version: &'static str,
    pub cpu_isa: &'static str,
    pub torch_threads: i32,
}

pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::Double => "float64",
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        _ => "other",
    }
}

pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(k) => format!("cuda:{k}"),
        _ => "cpu".to_string(),
    }
}

/// (max |a - b|, max |b|), computed in float64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    ensure!(
        a.size() == b.size(),
        "fused and unfused results differ in shape: {:?} vs {:?}",
        a.size(),
        b.size()
    );
    if a.numel() == 0 {
        return Ok((0.0, 0.0));
    }
    let (a, b) = (a.f_to_kind(Kind::Double)?, b.f_to_kind(Kind::Double)?);
    let diff = a.f_sub(&b)?.f_abs()?.f_max()?.f_double_value(&[])?;
    let scale = b.f_abs()?.f_max()?.f_double_value(&[])?;
    Ok((diff, scale))
}

pub fn table_header() -> String {
    let h = format!(
        "{:<26} {:<7} {:<8} {:<16} {:<16} {:>10} {:>10} {:>8} {:>9} {:>7} {:>6}",
        "loss",
        "device",
        "dtype",
        "shape",
        "pass",
        "fused ms",
        "unfused ms",
        "speedup",
        "max|diff|",
        "GB/s",
        "%copy"
    );
    let rule = "-".repeat(h.len());
    format!("{h}\n{rule}")
}

pub fn table_line(r: &Row) -> String {
    let opt = |v: Option<f64>, digits: usize| {
        v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
    };
    format!(
        "{:<26} {:<7} {:<8} {:<16} {:<16} {:>10.3} {:>10.3} {:>7.2}x {:>9.1e} {:>7} {:>6}",
        r.loss,
        r.device,
        r.dtype,
        r.shape,
        r.pass,
        r.fused_ms,
        r.unfused_ms,
        r.speedup,
        r.max_abs_diff,
        opt(r.fused_gbps, 0),
        opt(r.fused_pct_of_copy, 0),
    )
}

pub fn write_json(path: &PathBuf, rows: &[Row]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(rows)?;
    std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
}

/// A row of an earlier `report.json`, as far as a comparison needs it.
#[derive(Debug, Deserialize)]
pub struct BaselineRow {
    pub loss: String,
    pub device: String,
    pub dtype: String,
    pub shape: String,
    pub pass: String,
    pub fused_ms: f64,
    pub unfused_ms: f64,
    /// Absent in reports written before the spread was recorded.
    #[serde(default)]
    pub fused_spread: f64,
    #[serde(default)]
    pub unfused_spread: f64,
}

/// Reads an earlier `report.json`.
pub fn read_baseline(path: &Path) -> Result<Vec<BaselineRow>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a profile report", path.display()))
}

/// A figure that got slower than an earlier report's by more than the noise of both runs.
#[derive(Debug, PartialEq)]
pub struct Regression {
    /// `loss device dtype shape pass` and which side, `fused` or `unfused`.
    pub what: String,
    pub before_ms: f64,
    pub now_ms: f64,
    /// How much slower may still be noise: the larger spread of the two runs, twice, and at
    /// least 5 %.
    pub tolerance: f64,
}

/// The figures of `rows` slower than their match in `before` (same loss, device, dtype, shape
/// and pass) by more than the tolerance.
pub fn regressions(rows: &[Row], before: &[BaselineRow]) -> Vec<Regression> {
    let mut out = Vec::new();
    for r in rows {
        let Some(b) = before.iter().find(|b| {
            b.loss == r.loss
                && b.device == r.device
                && b.dtype == r.dtype
                && b.shape == r.shape
                && b.pass == r.pass
        }) else {
            continue;
        };
        for (side, now, then, s_now, s_then) in [
            (
                "fused",
                r.fused_ms,
                b.fused_ms,
                r.fused_spread,
                b.fused_spread,
            ),
            (
                "unfused",
                r.unfused_ms,
                b.unfused_ms,
                r.unfused_spread,
                b.unfused_spread,
            ),
        ] {
            let tolerance = (2.0 * s_now.max(s_then)).max(0.05);
            if now > then * (1.0 + tolerance) {
                out.push(Regression {
                    what: format!(
                        "{} {} {} {} {} {side}",
                        r.loss, r.device, r.dtype, r.shape, r.pass
                    ),
                    before_ms: then,
                    now_ms: now,
                    tolerance,
                });
            }
        }
    }
    out
}

/// The report as a Markdown table, ready to paste.
pub fn markdown(rows: &[Row]) -> String {
    let python = rows.iter().any(|r| r.pytorch_eager_ms.is_some());
    let mut s = String::from(
        "| loss | device | dtype | shape | pass | fused ms | unfused ms | speedup | %copy |",
    );
    s += if python {
        " PyTorch eager ms | torch.compile ms |\n"
    } else {
        "\n"
    };
    s += "|---|---|---|---|---|---:|---:|---:|---:|";
    s += if python { "---:|---:|\n" } else { "\n" };
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
    for r in rows {
        let pct = r
            .fused_pct_of_copy
            .map_or_else(|| "-".to_string(), |p| format!("{p:.0} %"));
        s += &format!(
            "| {} | {} | {} | {} | {} | {:.3} | {:.3} | **{:.2}x** | {} |",
            r.loss, r.device, r.dtype, r.shape, r.pass, r.fused_ms, r.unfused_ms, r.speedup, pct
        );
        if python {
            s += &format!(
                " {} | {} |",
                opt(r.pytorch_eager_ms),
                opt(r.pytorch_compiled_ms)
            );
        }
        s += "\n";
    }
    s
}

/// The report as a PNG: per loss and pass, a bar for the fused and one for the unfused time
/// (log scale), labelled with the speedup.
pub fn write_chart(path: &Path, rows: &[Row]) -> Result<()> {
    let python = rows.iter().any(|r| r.pytorch_eager_ms.is_some());
    let bars = rows
        .iter()
        .map(|r| {
            let mut values = vec![r.fused_ms, r.unfused_ms];
            if python {
                values.push(r.pytorch_eager_ms.unwrap_or(f64::NAN));
                values.push(r.pytorch_compiled_ms.unwrap_or(f64::NAN));
            }
            chart::BarGroup {
                label: format!("{} {} {} {}", r.loss, r.device, r.dtype, r.pass),
                values,
                note: format!("{:.1}x", r.speedup),
            }
        })
        .collect();
    let mut series = vec![
        ("fused".into(), chart::PALETTE[0]),
        ("unfused".into(), chart::PALETTE[1]),
    ];
    if python {
        series.push(("PyTorch eager".into(), chart::PALETTE[2]));
        series.push(("torch.compile".into(), chart::PALETTE[4]));
    }
    let c = chart::BarChart {
        title: "tch-detloss: fused against unfused (ms, log scale; label: speedup)".into(),
        series,
        groups: bars,
        unit: "ms".into(),
    };
    c.save(path)
}
