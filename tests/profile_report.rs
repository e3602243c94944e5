//! The profile command's report outside a timing run: the Markdown table and the PNG chart are
//! written and hold every row, and the comparison with an earlier report flags an injected
//! slowdown and nothing within the noise.

#[path = "../examples/common/chart.rs"]
mod chart;
// The table and JSON helpers of the module are the profile command's business, not tested here.
#[allow(dead_code)]
#[path = "../benches/profile/report.rs"]
mod report;

use report::{markdown, read_baseline, regressions, write_chart, write_json, Row};

fn row(loss: &str, pass: &'static str, fused_ms: f64, unfused_ms: f64, spread: f64) -> Row {
    Row {
        loss: loss.into(),
        device: "cpu".into(),
        dtype: "float32",
        shape: "[40000, 80]".into(),
        n: 40000,
        c: 80,
        pass,
        fused_ms,
        unfused_ms,
        fused_min_ms: fused_ms * 0.9,
        unfused_min_ms: unfused_ms * 0.9,
        fused_spread: spread,
        unfused_spread: spread,
        speedup: unfused_ms / fused_ms,
        max_abs_diff: 1e-7,
        unfused_max_abs: 1.0,
        warmup: 3,
        reps: 25,
        fused_bytes: None,
        fused_gbps: None,
        copy_gbps: None,
        fused_pct_of_copy: None,
        fused_peak_bytes: None,
        unfused_peak_bytes: None,
        crate_version: "test",
        cpu_isa: "test",
        torch_threads: 2,
    }
}

fn rows() -> Vec<Row> {
    vec![
        row("FocalLoss", "forward", 10.0, 50.0, 0.02),
        row("FocalLoss", "forward+backward", 11.0, 80.0, 0.02),
        row("GIoULoss positives", "forward+backward", 0.4, 4.0, 0.10),
    ]
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn markdown_and_chart_hold_every_row() {
    let rows = rows();
    let md = markdown(&rows);
    assert_eq!(
        md.lines().count(),
        2 + rows.len(),
        "header, rule and one line a row:\n{md}"
    );
    assert!(md.contains("| FocalLoss | cpu | float32 | [40000, 80] | forward+backward | 11.000 | 80.000 | **7.27x** | - |"), "{md}");
    let png = scratch("report").join("report.png");
    write_chart(&png, &rows).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
    // Width 900; the height grows with the rows (IHDR: bytes 16..24).
    let (w, h) = (
        u32::from_be_bytes(bytes[16..20].try_into().unwrap()),
        u32::from_be_bytes(bytes[20..24].try_into().unwrap()),
    );
    assert_eq!(w, 900);
    write_chart(&png, &rows[..1]).unwrap();
    let one = std::fs::read(&png).unwrap();
    assert!(
        h > u32::from_be_bytes(one[20..24].try_into().unwrap()),
        "three rows need more height than one"
    );
}

#[test]
fn baseline_flags_an_injected_slowdown_only() {
    let dir = scratch("baseline");
    let before = rows();
    write_json(&dir.join("before.json"), &before).unwrap();
    let base = read_baseline(&dir.join("before.json")).unwrap();
    // The same figures, one fused time 40 % slower, one 3 % slower (within the 5 % floor) and
    // the GIoU row 15 % slower with a measured spread of 10 % (within twice the noise).
    let mut now = rows();
    now[0].fused_ms *= 1.40;
    now[1].unfused_ms *= 1.03;
    now[2].fused_ms *= 1.15;
    let slower = regressions(&now, &base);
    assert_eq!(slower.len(), 1, "{slower:?}");
    assert_eq!(
        slower[0].what,
        "FocalLoss cpu float32 [40000, 80] forward fused"
    );
    assert!((slower[0].now_ms - 14.0).abs() < 1e-9 && (slower[0].before_ms - 10.0).abs() < 1e-9);
    assert!(
        regressions(&before, &base).is_empty(),
        "a report against itself"
    );
}
