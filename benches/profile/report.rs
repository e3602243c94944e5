//! The report: one row per (loss, device, dtype, pass), as a table and as JSON.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

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
