//! Profiling: a CPU trace of a fused forward and backward holds the loss's range and backward
//! node and agrees with its summary; the CUDA-only tools say so clearly without CUDA; the profile
//! command's Markdown table and PNG chart hold every row, and its comparison with an earlier
//! report flags an injected slowdown and nothing within the noise.

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
        pytorch_eager_ms: None,
        pytorch_compiled_ms: None,
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

#[test]
fn cpu_trace_of_a_fused_step_names_the_loss_and_its_backward() {
    use tch::{Device, Kind, Tensor};
    use tch_detloss::profiler::{Trace, TraceConfig};
    use tch_detloss::{registry, LossArgs};
    let loss = registry::build_str(r#"{"type": "GIoULoss", "loss_weight": 2.0}"#).unwrap();
    let xy = Tensor::rand([64, 2], (Kind::Float, Device::Cpu)) * 50.0;
    let boxes = Tensor::cat(&[&xy, &(&xy + 10.0)], 1);
    let pred = (&boxes + 1.0).set_requires_grad(true);
    let path = scratch("trace").join("giou.json");
    let trace = Trace::start(TraceConfig::cpu()).unwrap();
    for _ in 0..3 {
        let l = loss
            .forward(&pred, (&boxes).into(), &LossArgs::new())
            .unwrap();
        l.backward();
    }
    let summary = trace.stop(Some(&path)).unwrap();
    // The summary: 3 calls of the loss's range and of its backward node, nested time no larger
    // than the whole.
    for name in ["GIoULoss", "GIoULossBackward"] {
        let op = summary
            .op(name)
            .unwrap_or_else(|| panic!("{name} missing from\n{}", summary.table(30)));
        assert_eq!(op.calls, 3, "{name}");
        assert!(
            op.self_us <= op.total_us + 1e-9 && op.total_us > 0.0,
            "{op:?}"
        );
    }
    // Consistent with its events: per op, the calls and the total time are the events'.
    for op in &summary.ops {
        let evs: Vec<_> = summary
            .events
            .iter()
            .filter(|e| e.name == op.name && e.device == op.device)
            .collect();
        assert_eq!(evs.len() as u64, op.calls, "{}", op.name);
        let total: i64 = evs.iter().map(|e| e.duration_ns).sum();
        assert!(
            (total as f64 / 1e3 - op.total_us).abs() < 1e-6 * op.total_us.max(1.0),
            "{}",
            op.name
        );
    }
    // The trace file: Chrome/Perfetto JSON with the same named events.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let events = json["traceEvents"].as_array().expect("traceEvents");
    for name in ["GIoULoss", "GIoULossBackward"] {
        let n = events.iter().filter(|e| e["name"] == name).count();
        assert_eq!(n, 3, "{name} events in the trace file");
    }
}

#[test]
fn cuda_tools_work_with_cuda_and_say_so_without() {
    use tch_detloss::profiler::{Trace, TraceConfig};
    if tch::Cuda::is_available() {
        // With a device the same calls succeed (the GPU tests check what they report).
        let stats = tch_detloss::cuda::memory_stats(0).unwrap();
        assert!(stats.allocated_peak >= stats.allocated, "{stats:?}");
        tch_detloss::cuda::empty_cache().unwrap();
        let guard = tch_detloss::cuda::sync_debug(tch_detloss::cuda::SyncDebugMode::Warn).unwrap();
        drop(guard);
        let t = Trace::start(TraceConfig {
            cuda: true,
            shapes: false,
            memory: false,
        })
        .unwrap();
        t.stop(None).unwrap();
        return;
    }
    let err = Trace::start(TraceConfig {
        cuda: true,
        shapes: false,
        memory: false,
    })
    .err()
    .expect("an error");
    assert!(format!("{err:#}").contains("no CUDA device"), "{err:#}");
    assert_eq!(tch_detloss::cuda::allocated_bytes(0), None);
    assert!(!tch_detloss::cuda::reset_peak_allocated(0));
    for err in [
        tch_detloss::cuda::memory_stats(0)
            .map(|_| ())
            .expect_err("an error"),
        tch_detloss::cuda::empty_cache().expect_err("an error"),
        tch_detloss::cuda::record_memory_history(true).expect_err("an error"),
        tch_detloss::cuda::memory_snapshot(&scratch("snapshot").join("s.pickle"))
            .expect_err("an error"),
    ] {
        let msg = format!("{err:#}");
        assert!(
            msg.contains("no CUDA device") || msg.contains("no libtorch CUDA side"),
            "{msg}"
        );
    }
    let err = tch_detloss::cuda::sync_debug(tch_detloss::cuda::SyncDebugMode::Error)
        .expect_err("an error");
    assert!(format!("{err:#}").contains("sync-debug mode"), "{err:#}");
}
