//! `cargo bench --bench profile [-- OPTIONS]` (or `make profile`): the fused losses against
//! their stock-op compositions, side by side, in one process, on every device present.
//!
//! # What it measures
//!
//! For every loss of `workloads::WORKLOADS` (built from an MMDetection config dict), on the CPU
//! and on each CUDA device, at the shapes of the heads that use it (DESIGN.md §7), it times three
//! passes of `Loss::forward` (fused) and of `Loss::forward_unfused` (stock tch ops, the
//! baseline a user writes today):
//!
//! - `forward`: the loss call, with `pred.requires_grad` set as in training. An implementation
//!   may do backward work here: the unfused variant saves its intermediates, and the fused CPU
//!   kernels write the gradient during this pass (the backward only scales it).
//! - `backward`: each repetition runs the forward pass outside the clock, then times
//!   `Tensor::run_backward(&[&loss], &[&pred], ..)` on that fresh graph: exactly the work of
//!   `loss.backward()` in a training step (autograd engine included). The gradient is returned,
//!   not accumulated into `pred.grad()`.
//! - `forward+backward`: both under one clock: the loss's share of a training step, and the
//!   figure that compares whole steps whatever work an implementation moves between passes.
//!
//! Each figure is the median of `reps` repetitions after `warmup` untimed ones (the JSON also
//! keeps the fastest); the fused and unfused repetitions alternate (`f u u f f u ...`), so a
//! background load that comes and goes slows both alike. On CUDA the device is synchronized
//! before the clock starts and before it stops, so what is timed is the work on the device,
//! never the asynchronous launch. `avg_factor` is a 0-dim tensor on the loss's device (the
//! number of positives, as RetinaNet computes it), so the fused variant reads nothing back to
//! the host (the unfused compositions do where MMDetection's code does: `nonzero` in
//! QualityFocalLoss, the per-bin counts of GHMC).
//!
//! Inputs mimic the heads (see `workloads`): for the dense heads (RetinaNet, GFL, VFNet) logits
//! around the prior bias (about -4), 1 % positive anchors with a random class, 5 % ignored
//! anchors (label weight 0), IoU-like scores in (0.1, 1] for the positives; an LVIS-sized RoI
//! head (8,192 RoIs x 1,204 classes) for the softmax cross-entropy; GFL's 17-bin side
//! distributions (4 sides x 40,000 anchors) for DistributionFocalLoss.
//!
//! # What it reports
//!
//! One row per (loss, device, dtype, pass): median fused and unfused milliseconds, the speedup
//! (unfused / fused) and the largest absolute difference between the two results (the loss
//! values for `forward`; the gradients w.r.t. `pred` for `backward` and `forward+backward`,
//! which compute the same gradient). On CUDA also:
//! - `fused_gbps`: the bytes the fused pass has to move at the least (forward reads `pred`, the
//!   labels or target, the scores and the weights once; backward reads the same and writes the
//!   gradient; `forward+backward` is the sum), divided by the median time;
//! - `copy_gbps`: the bandwidth a device-to-device `copy_` of a 1 GiB tensor achieves on this
//!   card (read + write bytes over time), the practical ceiling for a memory-bound kernel, and
//!   `fused_pct_of_copy` = `fused_gbps / copy_gbps`;
//! - `fused_peak_bytes` / `unfused_peak_bytes`: the peak of libtorch's CUDA caching allocator
//!   during one forward+backward of each variant, above what was allocated before it (the
//!   inputs), read through `tch_detloss::cuda::allocated_bytes`. `null` on the CPU, where there
//!   is no per-variant measure (the process's high-water RSS never goes down).
//!
//! The table goes to stdout; the same rows go, as a JSON array, to `target/profile/report.json`
//! under the crate root (or `--json PATH`).
//!
//! # Options
//!
//! ```text
//! --quick          small shapes and few repetitions (a smoke test)
//! --device D       cpu, cuda (every CUDA device) or cuda:K; default: all present
//! --n N            rows; default: each loss's own (for the anchor losses 40000 on the CPU,
//!                  2 images x 20k, and 1600000 on CUDA, 16 images x 100k)
//! --c C            classes (or bins); default: each loss's own
//! --loss L[,L..]   only these losses (a prefix of the row name, e.g. CrossEntropyLoss)
//! --reps R         timed repetitions; default 25 on the CPU, 50 on CUDA
//! --warmup W       untimed repetitions first; default 3 on the CPU, 10 on CUDA
//! --threads T      torch's intra-op threads, used by both variants on the CPU (default: torch's
//!                  choice, one per core)
//! --json PATH      where to write the JSON rows
//! ```

#[path = "../../examples/common/chart.rs"]
mod chart;
mod options;
mod pytorch;
mod report;
mod timing;
mod workloads;

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};
use tch_detloss::profiler;
use tch_detloss::registry;

use options::{DeviceChoice, Options, USAGE};
use report::{
    device_name, dtype_name, markdown, max_abs_diff, read_baseline, regressions, table_header,
    table_line, write_chart, write_json, Row,
};
use timing::{backward_of, copy_gbps, whole, Clock};
use workloads::{Workload, WORKLOADS};

/// The three timed passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Forward,
    Backward,
    Both,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Pass::Forward => "forward",
            Pass::Backward => "backward",
            Pass::Both => "forward+backward",
        }
    }
}

/// One device's share of the run: its shape, repetition counts and (loss, dtype) cases.
struct Plan {
    device: Device,
    warmup: usize,
    reps: usize,
    /// The workloads and dtypes timed on this device.
    cases: Vec<(&'static Workload, Kind)>,
    /// Reference bandwidth of this device (CUDA only), in GB/s.
    copy_gbps: Option<f64>,
}

/// The plan of each device.
fn plans(o: &Options) -> Result<Vec<Plan>> {
    let cuda_count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
    let cuda: Vec<usize> = match o.device {
        DeviceChoice::Cpu => vec![],
        DeviceChoice::All => (0..cuda_count).collect(),
        DeviceChoice::Cuda(None) => {
            ensure!(
                cuda_count > 0,
                "--device cuda: no CUDA device found (tch::Cuda::device_count() is 0)"
            );
            (0..cuda_count).collect()
        }
        DeviceChoice::Cuda(Some(k)) => {
            ensure!(
                k < cuda_count,
                "--device cuda:{k}: this machine has {cuda_count} CUDA device(s)"
            );
            vec![k]
        }
    };
    if !cuda.is_empty() && !tch_detloss::cuda::kernels_built() {
        ensure!(
            o.device == DeviceChoice::All,
            "this build of tch-detloss has no CUDA kernels (nvcc was not found at build time); \
             run scripts/setup.sh and rebuild"
        );
        eprintln!(
            "note: skipping {} CUDA device(s): this build has no CUDA kernels (nvcc was not \
             found at build time; run scripts/setup.sh and rebuild)",
            cuda.len()
        );
    }

    let wanted: Vec<&'static Workload> = WORKLOADS.iter().filter(|w| o.wants(w.name)).collect();
    ensure!(
        !wanted.is_empty(),
        "--loss {:?} matches none of: {}",
        o.loss,
        WORKLOADS
            .iter()
            .map(|w| w.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut out = Vec::new();
    if matches!(o.device, DeviceChoice::All | DeviceChoice::Cpu) {
        out.push(Plan {
            device: Device::Cpu,
            warmup: o.warmup.unwrap_or(if o.quick { 1 } else { 3 }),
            reps: o.reps.unwrap_or(if o.quick { 3 } else { 15 }),
            cases: wanted.iter().map(|w| (*w, Kind::Float)).collect(),
            copy_gbps: None,
        });
    }
    if tch_detloss::cuda::kernels_built() {
        for k in cuda {
            out.push(Plan {
                device: Device::Cuda(k),
                warmup: o.warmup.unwrap_or(if o.quick { 2 } else { 10 }),
                reps: o.reps.unwrap_or(if o.quick { 5 } else { 50 }),
                cases: wanted
                    .iter()
                    .flat_map(|w| w.cuda_kinds.iter().map(move |k| (*w, *k)))
                    .collect(),
                copy_gbps: None,
            });
        }
    }
    Ok(out)
}
/// Runs the three passes of one (loss, dtype) case on one device.
fn profile_case(
    plan: &Plan,
    w: &Workload,
    (n, c): (i64, i64),
    kind: Kind,
    trace_dir: Option<&std::path::Path>,
    python: Option<&mut pytorch::Batch>,
) -> Result<Vec<Row>> {
    let loss = registry::build_str(w.config)?;
    // A second instance for the unfused path, so that a loss with state (GHM's momentum) sees
    // the same sequence of calls on both.
    let reference = registry::build_str(w.config)?;
    let x = (w.inputs)(n, c, kind, plan.device)?;
    let clock = Clock {
        cuda: match plan.device {
            Device::Cuda(k) => Some(k as i64),
            _ => None,
        },
        warmup: plan.warmup,
        reps: plan.reps,
    };
    let args = x.args();
    let fused = || loss.forward(&x.pred, x.target(), &args);
    let unfused = || reference.forward_unfused(&x.pred, x.target(), &args);
    // The gradient w.r.t. pred, returned rather than accumulated into pred.grad(); the graph is
    // freed, as `loss.backward()` frees it.
    let grad = |l: &Tensor| -> Result<Tensor> {
        let mut g = Tensor::f_run_backward(&[l], &[&x.pred], false, false)?;
        g.pop().context("run_backward returned no gradient")
    };

    // One untimed forward and backward of each: the values compared.
    let (l_fused, l_unfused) = (fused()?, unfused()?);
    let forward_diff = max_abs_diff(&l_fused, &l_unfused)?;
    let (g_fused, g_unfused) = (grad(&l_fused)?, grad(&l_unfused)?);
    let grad_diff = max_abs_diff(&g_fused, &g_unfused)?;
    drop((l_fused, l_unfused, g_fused, g_unfused));

    // Peak memory of one forward+backward of each, above what was allocated before it (the
    // inputs): from libtorch's caching allocator, on CUDA only.
    let peak = |step: &dyn Fn() -> Result<Tensor>| -> Result<Option<u64>> {
        let Some(k) = clock.cuda else { return Ok(None) };
        let ordinal = k as usize;
        tch::Cuda::synchronize(k);
        let Some((before, _)) = tch_detloss::cuda::allocated_bytes(ordinal) else {
            return Ok(None);
        };
        if !tch_detloss::cuda::reset_peak_allocated(ordinal) {
            return Ok(None);
        }
        drop(step()?);
        tch::Cuda::synchronize(k);
        Ok(tch_detloss::cuda::allocated_bytes(ordinal).map(|(_, p)| p.saturating_sub(before)))
    };
    let fused_peak = peak(&|| grad(&fused()?))?;
    let unfused_peak = peak(&|| grad(&unfused()?))?;

    let mut timed = Vec::with_capacity(3);
    // Which pass, after the "profiling <loss> on <device> in <dtype>" that main printed.
    let pass_note = |p: Pass| {
        eprint!(
            "\r\x1b[2Kprofiling {} on {} in {}: {}",
            w.name,
            device_name(plan.device),
            dtype_name(kind),
            p.name()
        );
    };
    pass_note(Pass::Forward);
    let (f, u) = clock.time_pair(whole(fused), whole(unfused))?;
    timed.push((Pass::Forward, f, u, forward_diff));
    pass_note(Pass::Backward);
    let (f, u) = clock.time_pair(backward_of(fused, grad), backward_of(unfused, grad))?;
    timed.push((Pass::Backward, f, u, grad_diff));
    pass_note(Pass::Both);
    let (f, u) = clock.time_pair(whole(|| grad(&fused()?)), whole(|| grad(&unfused()?)))?;
    timed.push((Pass::Both, f, u, grad_diff));

    if let (Some(py), Device::Cpu) = (python, plan.device) {
        py.add(w, &x)?;
    }

    // One traced forward+backward of each, outside the timing.
    if let Some(dir) = trace_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = profiler::TraceConfig {
            cuda: clock.cuda.is_some(),
            ..profiler::TraceConfig::cpu()
        };
        let stem = format!(
            "{}_{}_{}",
            w.name.replace(' ', "_"),
            device_name(plan.device).replace(':', ""),
            dtype_name(kind)
        );
        let t = profiler::Trace::start(config)?;
        drop(grad(&fused()?)?);
        t.stop(Some(&dir.join(format!("{stem}_fused.json"))))?;
        let t = profiler::Trace::start(config)?;
        drop(grad(&unfused()?)?);
        t.stop(Some(&dir.join(format!("{stem}_unfused.json"))))?;
    }

    let on_cuda = clock.cuda.is_some();
    Ok(timed
        .into_iter()
        .map(|(pass, fused, unfused, (diff, scale))| {
            let bytes =
                on_cuda.then(|| x.fused_bytes(pass != Pass::Backward, pass != Pass::Forward));
            let gbps = bytes.map(|b| b as f64 / (fused.median_ms * 1e-3) / 1e9);
            Row {
                loss: w.name.to_string(),
                device: device_name(plan.device),
                dtype: dtype_name(kind),
                shape: format!("{:?}", x.pred.size()),
                n,
                c,
                pass: pass.name(),
                fused_ms: fused.median_ms,
                unfused_ms: unfused.median_ms,
                fused_min_ms: fused.min_ms,
                unfused_min_ms: unfused.min_ms,
                fused_spread: fused.spread,
                unfused_spread: unfused.spread,
                pytorch_eager_ms: None,
                pytorch_compiled_ms: None,
                speedup: unfused.median_ms / fused.median_ms,
                max_abs_diff: diff,
                unfused_max_abs: scale,
                warmup: plan.warmup,
                reps: plan.reps,
                fused_bytes: bytes,
                fused_gbps: gbps,
                copy_gbps: plan.copy_gbps,
                fused_pct_of_copy: gbps.zip(plan.copy_gbps).map(|(g, c)| 100.0 * g / c),
                fused_peak_bytes: fused_peak,
                unfused_peak_bytes: unfused_peak,
                crate_version: env!("CARGO_PKG_VERSION"),
                cpu_isa: tch_detloss::cpu_isa(),
                torch_threads: tch::get_num_threads(),
            }
        })
        .collect())
}

fn main() -> Result<()> {
    let Some(opts) = Options::parse(std::env::args().skip(1))? else {
        println!("{USAGE}");
        return Ok(());
    };
    let started = Instant::now();
    if let Some(t) = opts.threads {
        tch::set_num_threads(t);
    }
    tch::manual_seed(0);
    workloads::register_adapters()?;
    let mut plans = plans(&opts)?;

    println!(
        "tch-detloss {} profile: fused kernels against stock tch ops (unfused)",
        env!("CARGO_PKG_VERSION")
    );
    println!(
        "cpu executor: {} | torch threads: {} | CUDA kernels built: {} | CUDA devices: {}",
        tch_detloss::cpu_isa(),
        tch::get_num_threads(),
        if tch_detloss::cuda::kernels_built() {
            "yes"
        } else {
            "no"
        },
        tch::Cuda::device_count()
    );
    for plan in &mut plans {
        let Device::Cuda(k) = plan.device else {
            continue;
        };
        let gbps = copy_gbps(k).with_context(|| format!("measuring copy bandwidth on cuda:{k}"))?;
        println!("cuda:{k}: device-to-device copy of 1 GiB: {gbps:.0} GB/s (read + write), the %copy reference");
        plan.copy_gbps = Some(gbps);
    }
    for plan in &plans {
        println!(
            "{}: median of {} reps after {} warm-up",
            device_name(plan.device),
            plan.reps,
            plan.warmup
        );
    }
    println!();
    println!("{}", table_header());

    let mut python = if opts.pytorch {
        Some(pytorch::Batch::new(&opts.json.with_extension("pytorch"))?)
    } else {
        None
    };
    let mut rows = Vec::new();
    for plan in &plans {
        for &(w, kind) in &plan.cases {
            let dims = match plan.device {
                Device::Cpu => opts.shape(w.cpu_shape),
                _ => opts.shape(w.cuda_shape),
            };
            eprint!(
                "\r\x1b[2Kprofiling {} on {} in {} ...",
                w.name,
                device_name(plan.device),
                dtype_name(kind)
            );
            let traces = opts.trace.as_deref();
            let case =
                profile_case(plan, w, dims, kind, traces, python.as_mut()).with_context(|| {
                    format!(
                        "profiling {} on {} in {}",
                        w.name,
                        device_name(plan.device),
                        dtype_name(kind)
                    )
                })?;
            eprint!("\r\x1b[2K");
            for row in case {
                println!("{}", table_line(&row));
                rows.push(row);
            }
        }
    }

    if let Some(py) = python {
        py.run(&mut rows, opts.reps.unwrap_or(15), !opts.no_compile)?;
    }

    println!("\nforward+backward, fused against unfused:");
    for r in rows.iter().filter(|r| r.pass == Pass::Both.name()) {
        println!(
            "  {:<26} {:<7} {:<8} {:>6.2}x",
            r.loss, r.device, r.dtype, r.speedup
        );
    }
    write_json(&opts.json, &rows)?;
    let (md, png) = (
        opts.json.with_extension("md"),
        opts.json.with_extension("png"),
    );
    std::fs::write(&md, markdown(&rows)).with_context(|| format!("writing {}", md.display()))?;
    write_chart(&png, &rows)?;
    println!(
        "\n{} rows written to {} (table: {}, chart: {}); wall time {:.1} s",
        rows.len(),
        opts.json.display(),
        md.display(),
        png.display(),
        started.elapsed().as_secs_f64()
    );
    if let Some(base) = &opts.baseline {
        let slower = regressions(&rows, &read_baseline(base)?);
        if slower.is_empty() {
            println!(
                "against {}: nothing slower beyond the noise of both runs",
                base.display()
            );
        } else {
            println!(
                "against {}: {} figures slower beyond the noise:",
                base.display(),
                slower.len()
            );
            for r in &slower {
                println!(
                    "  {}: {:.3} ms -> {:.3} ms (+{:.0} %, noise tolerance {:.0} %)",
                    r.what,
                    r.before_ms,
                    r.now_ms,
                    100.0 * (r.now_ms / r.before_ms - 1.0),
                    100.0 * r.tolerance
                );
            }
        }
    }
    Ok(())
}
