//! `cargo bench --bench targets [-- OPTIONS]` (run by `make profile` after the loss bench): the
//! crate's batched, sync-free assigners against MMDetection's per-image Python written with stock
//! tch ops, side by side, in one process, on every device present.
//!
//! # What it measures
//!
//! Two assigners of the one-stage heads whose assignment depends on the predictions, at
//! MMDetection's training scale (`workload::SHAPE`: 8 images of 640 x 640, strides 8/16/32 so
//! 8,400 priors per image, 80 classes, 20 ground truths per image):
//!
//! - `DynamicSoftLabelAssigner` (RTMDet, `{"type": "DynamicSoftLabelAssigner", "topk": 13}`) on
//!   the `MlvlPointGenerator` points (offset 0, with strides), the decoded boxes and the class
//!   logits;
//! - `TaskAlignedAssigner` (TOOD, `{"type": "TaskAlignedAssigner", "topk": 13}`, alpha 1 and
//!   beta 6 as TOODHead passes them) on the `AnchorGenerator` anchors (one per location,
//!   `octave_base_scale` 8), the decoded boxes and the sigmoid scores.
//!
//! Each is timed two ways on the same inputs:
//!
//! - `crate`: `GtBatch::pad` of the per-image ground truths, then one batched `assign` over the
//!   whole batch (tensor ops only, no host read);
//! - `baseline` (`mmdet.rs`): MMDetection 3.3's `assign` written op for op with stock tch ops and
//!   called image by image, with its per-ground-truth loop in `dynamic_k_matching`, its boolean
//!   indexing, `nonzero` and `.item()` reads, as a user who ports the Python gets it.
//!
//! The predictions (see `workload`) copy, jittered, the ground truth that holds a prior's centre
//! for 80 % of such priors (with a raised logit for its class) and are random boxes around the
//! prior elsewhere, so that each ground truth has real candidates and the dynamic k's and
//! top-k's have work to do.
//!
//! Each figure is the median of `reps` repetitions after `warmup` untimed ones of each; the two
//! variants alternate (`b c c b b c ...`), so a background load slows both alike. On CUDA the
//! device is synchronized before the clock starts and before it stops (and the baseline's host
//! reads synchronize it on their own, as in MMDetection).
//!
//! Before timing, one call of each is compared: the assigned ground-truth indices and labels must
//! be equal at every prior, and the largest |difference| of `max_overlaps` (and of the
//! task-aligned `assign_metrics`) is reported. A disagreement in the indices or labels fails the
//! bench.
//!
//! # What it reports
//!
//! One row per (assigner, device): median milliseconds of the baseline and of the crate, the
//! speedup (baseline / crate), the positives, the mismatches and the largest differences; as a
//! Markdown table on stdout and as a JSON array in `target/targets-bench/report.json` under the
//! crate root (or `--json PATH`). `--profile` adds, per row, the ops with the largest self time in
//! one traced call of each variant (libtorch's Kineto profiler, `tch_detloss::profiler`), which
//! shows where the time of each goes.
//!
//! # Options
//!
//! ```text
//! --quick          few repetitions (1 warm-up, 3 timed): a smoke test
//! --reps N         timed repetitions; default 11 on the CPU, 30 on CUDA
//! --warmup W       untimed repetitions first; default 2 on the CPU, 5 on CUDA
//! --device D       cpu, cuda (every CUDA device) or cuda:K; default: all present
//! --assigner A     dsl or tal (DynamicSoftLabelAssigner / TaskAlignedAssigner); default both
//! --threads T      torch's intra-op threads on the CPU (default: torch's choice)
//! --profile        also print the top ops of one traced call of each variant
//! --seed S         the inputs' seed (default 2024)
//! --save FILE      save the crate's results (one call per row) to FILE (libtorch's format)
//! --against FILE   compare the crate's results bit for bit with a FILE saved before (by an
//!                  earlier build: an optimisation must not change a bit)
//! --json PATH      where to write the JSON rows
//! ```

mod mmdet;
#[allow(dead_code)]
#[path = "../profile/timing.rs"]
mod timing;
mod workload;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};
use tch_detloss::profiler;
use tch_detloss::task_modules::{DynamicSoftLabelAssigner, GtBatch, TaskAlignedAssigner};

use timing::{whole, Clock, Timing};
use workload::{Batch, Priors, SHAPE};

const USAGE: &str = "\
usage: cargo bench --bench targets [-- OPTIONS]

Times the crate's batched assigners (DynamicSoftLabelAssigner, TaskAlignedAssigner) against
MMDetection's per-image Python written with stock tch ops, at 8 x 640 x 640 / 80 classes /
20 ground truths per image, on every device present; prints a Markdown table and writes JSON.

options:
  --quick          few repetitions (1 warm-up, 3 timed)
  --reps N         timed repetitions; default 11 on the CPU, 30 on CUDA
  --warmup W       untimed repetitions first; default 2 on the CPU, 5 on CUDA
  --device D       cpu, cuda (every CUDA device) or cuda:K; default: all present
  --assigner A     dsl or tal; default both
  --threads T      torch's intra-op threads on the CPU (default: torch's choice)
  --profile        also print the top ops (self time) of one traced call of each variant
  --seed S         the inputs' seed (default 2024)
  --save FILE      save the crate's results to FILE
  --against FILE   compare the crate's results bit for bit with a FILE saved before
  --json PATH      where to write the JSON rows (default: target/targets-bench/report.json)
  -h, --help       this text";

/// The assigners' configs, as RTMDet's and TOOD's `train_cfg` give them.
const DSL_CONFIG: &str = r#"{"type": "DynamicSoftLabelAssigner", "topk": 13}"#;
const TAL_CONFIG: &str = r#"{"type": "TaskAlignedAssigner", "topk": 13}"#;
/// TOODHead's `train_cfg` alpha and beta.
const ALPHA: i64 = 1;
const BETA: i64 = 6;
/// Ops listed per traced variant with `--profile`.
const PROFILE_TOP: usize = 60;
/// The inputs' default seed.
const SEED: i64 = 2024;

#[derive(Debug)]
struct Options {
    quick: bool,
    reps: Option<usize>,
    warmup: Option<usize>,
    device: Option<String>,
    assigner: Option<String>,
    threads: Option<i32>,
    profile: bool,
    seed: i64,
    save: Option<PathBuf>,
    against: Option<PathBuf>,
    json: PathBuf,
}

impl Options {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Self>> {
        let mut o = Options {
            quick: false,
            reps: None,
            warmup: None,
            device: None,
            assigner: None,
            threads: None,
            profile: false,
            seed: SEED,
            save: None,
            against: None,
            json: PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/target/targets-bench/report.json"
            )),
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (key, inline) = match arg.split_once('=') {
                Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = || -> Result<String> {
                match inline.clone() {
                    Some(v) => Ok(v),
                    None => args
                        .next()
                        .with_context(|| format!("{key} needs a value\n\n{USAGE}")),
                }
            };
            let count = |v: String| -> Result<usize> {
                v.parse()
                    .with_context(|| format!("{key}: {v:?} is not a count"))
            };
            match key.as_str() {
                // cargo passes `--bench` to every bench binary.
                "--bench" => {}
                "-h" | "--help" => return Ok(None),
                "--quick" => o.quick = true,
                "--reps" => {
                    let r = count(value()?)?;
                    ensure!(r > 0, "--reps must be positive");
                    o.reps = Some(r);
                }
                "--warmup" => o.warmup = Some(count(value()?)?),
                "--device" => o.device = Some(value()?),
                "--assigner" => {
                    let a = value()?;
                    ensure!(
                        a == "dsl" || a == "tal",
                        "--assigner: expected dsl or tal, got {a:?}"
                    );
                    o.assigner = Some(a);
                }
                "--threads" => {
                    let t = count(value()?)?;
                    ensure!(t > 0, "--threads must be positive");
                    o.threads = Some(i32::try_from(t).context("--threads: too large")?);
                }
                "--profile" => o.profile = true,
                "--seed" => {
                    let v = value()?;
                    o.seed = v
                        .parse()
                        .with_context(|| format!("--seed: {v:?} is not an integer"))?;
                }
                "--save" => o.save = Some(PathBuf::from(value()?)),
                "--against" => o.against = Some(PathBuf::from(value()?)),
                "--json" => o.json = PathBuf::from(value()?),
                _ => bail!("unknown argument {arg:?}\n\n{USAGE}"),
            }
        }
        Ok(Some(o))
    }

    fn devices(&self) -> Result<Vec<Device>> {
        let cuda = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
        Ok(match self.device.as_deref() {
            None => std::iter::once(Device::Cpu)
                .chain((0..cuda).map(Device::Cuda))
                .collect(),
            Some("cpu") => vec![Device::Cpu],
            Some("cuda") => {
                ensure!(cuda > 0, "--device cuda: no CUDA device found");
                (0..cuda).map(Device::Cuda).collect()
            }
            Some(d) => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(k)) if k < cuda => vec![Device::Cuda(k)],
                Some(Ok(k)) => bail!("--device cuda:{k}: this machine has {cuda} CUDA device(s)"),
                _ => bail!("--device: expected cpu, cuda or cuda:K, got {d:?}"),
            },
        })
    }

    fn clock(&self, device: Device) -> Clock {
        let cuda = match device {
            Device::Cuda(k) => Some(k as i64),
            _ => None,
        };
        let (warmup, reps) = match (self.quick, cuda.is_some()) {
            (true, _) => (1, 3),
            (false, false) => (2, 11),
            (false, true) => (5, 30),
        };
        Clock {
            cuda,
            warmup: self.warmup.unwrap_or(warmup),
            reps: self.reps.unwrap_or(reps),
        }
    }
}

/// One row of the table and one object of the JSON report.
#[derive(Debug, Serialize)]
struct Row {
    assigner: &'static str,
    config: &'static str,
    device: String,
    images: i64,
    priors_per_image: i64,
    classes: i64,
    gts_per_image: i64,
    /// Medians.
    baseline_ms: f64,
    crate_ms: f64,
    /// baseline_ms / crate_ms.
    speedup: f64,
    baseline_min_ms: f64,
    crate_min_ms: f64,
    /// Interquartile range over median of the repetitions.
    baseline_spread: f64,
    crate_spread: f64,
    /// Positive priors over the batch (the crate's; the baseline's are equal when the
    /// mismatches are 0).
    positives: i64,
    /// Priors whose assigned ground truth / label differ between the two.
    gt_inds_mismatches: i64,
    labels_mismatches: i64,
    /// Largest |crate - baseline| of `max_overlaps` over all priors.
    max_overlaps_max_abs_diff: f64,
    /// The same for `assign_metrics` (TaskAlignedAssigner only).
    assign_metrics_max_abs_diff: Option<f64>,
    warmup: usize,
    reps: usize,
    torch_threads: i32,
    crate_version: &'static str,
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(k) => format!("cuda:{k}"),
        _ => "cpu".to_string(),
    }
}

/// The batched result of either variant, `(B, N)` each.
struct Assigned {
    gt_inds: Tensor,
    max_overlaps: Tensor,
    labels: Tensor,
    assign_metrics: Option<Tensor>,
}

impl Assigned {
    /// The baseline's call per image, `f(image)`, as `multi_apply` makes it, stacked.
    fn per_image(
        batch: &Batch,
        f: impl Fn(usize) -> Result<mmdet::ImageResult>,
    ) -> Result<Assigned> {
        Assigned::stack(
            (0..batch.gt_bboxes.len())
                .map(f)
                .collect::<Result<Vec<_>>>()?,
        )
    }

    fn stack(images: Vec<mmdet::ImageResult>) -> Result<Assigned> {
        let field = |f: &dyn Fn(&mmdet::ImageResult) -> Tensor| -> Result<Tensor> {
            Ok(Tensor::f_stack(
                &images.iter().map(f).collect::<Vec<_>>(),
                0,
            )?)
        };
        Ok(Assigned {
            gt_inds: field(&|r| r.gt_inds.shallow_clone())?,
            max_overlaps: field(&|r| r.max_overlaps.shallow_clone())?,
            labels: field(&|r| r.labels.shallow_clone())?,
            assign_metrics: match images.first().and_then(|r| r.assign_metrics.as_ref()) {
                Some(_) => Some(field(&|r| {
                    r.assign_metrics
                        .as_ref()
                        .map(Tensor::shallow_clone)
                        .unwrap_or_else(|| r.gt_inds.zeros_like())
                })?),
                None => None,
            },
        })
    }
}

/// Mismatches of two integer tensors.
fn mismatches(a: &Tensor, b: &Tensor) -> Result<i64> {
    ensure!(
        a.size() == b.size(),
        "shapes {:?} and {:?}",
        a.size(),
        b.size()
    );
    Ok(a.f_ne_tensor(b)?.f_sum(Kind::Int64)?.f_int64_value(&[])?)
}

/// Largest |a - b|.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    ensure!(
        a.size() == b.size(),
        "shapes {:?} and {:?}",
        a.size(),
        b.size()
    );
    let (a, b) = (a.f_to_kind(Kind::Double)?, b.f_to_kind(Kind::Double)?);
    Ok(a.f_sub(&b)?.f_abs()?.f_max()?.f_double_value(&[])?)
}

/// What `profile_pair` needs of an assigner: its two variants over one batch.
struct Case<'a> {
    name: &'static str,
    config: &'static str,
    baseline: Box<dyn Fn() -> Result<Assigned> + 'a>,
    fast: Box<dyn Fn() -> Result<Assigned> + 'a>,
}

fn dsl_case(batch: &Batch) -> Result<Case<'_>> {
    let a = DynamicSoftLabelAssigner::from_config(&serde_json::from_str(DSL_CONFIG)?)?;
    let base = mmdet::DynamicSoftLabel {
        soft_center_radius: a.soft_center_radius,
        topk: a.topk,
        iou_weight: a.iou_weight,
    };
    Ok(Case {
        name: "DynamicSoftLabelAssigner",
        config: DSL_CONFIG,
        baseline: Box::new(move || {
            Assigned::per_image(batch, |i| {
                base.assign(
                    &batch.priors,
                    &batch.decoded.get(i as i64),
                    &batch.logits.get(i as i64),
                    &batch.gt_bboxes[i],
                    &batch.gt_labels[i],
                )
            })
        }),
        fast: Box::new(move || {
            let gts = GtBatch::pad(&batch.gt_bboxes, &batch.gt_labels)?;
            let r = a.assign(&batch.priors, &batch.decoded, &batch.logits, &gts, None)?;
            Ok(Assigned {
                gt_inds: r.gt_inds,
                max_overlaps: r.max_overlaps,
                labels: r.labels,
                assign_metrics: None,
            })
        }),
    })
}

fn tal_case(batch: &Batch) -> Result<Case<'_>> {
    let a = TaskAlignedAssigner::from_config(&serde_json::from_str(TAL_CONFIG)?)?;
    let base = mmdet::TaskAligned { topk: a.topk };
    Ok(Case {
        name: "TaskAlignedAssigner",
        config: TAL_CONFIG,
        baseline: Box::new(move || {
            Assigned::per_image(batch, |i| {
                base.assign(
                    &batch.priors,
                    &batch.decoded.get(i as i64),
                    &batch.probs.get(i as i64),
                    &batch.gt_bboxes[i],
                    &batch.gt_labels[i],
                    ALPHA,
                    BETA,
                )
            })
        }),
        fast: Box::new(move || {
            let gts = GtBatch::pad(&batch.gt_bboxes, &batch.gt_labels)?;
            let r = a.assign(
                &batch.priors,
                &batch.decoded,
                &batch.probs,
                &gts,
                ALPHA as f64,
                BETA as f64,
                None,
            )?;
            Ok(Assigned {
                gt_inds: r.result.gt_inds,
                max_overlaps: r.result.max_overlaps,
                labels: r.result.labels,
                assign_metrics: Some(r.assign_metrics),
            })
        }),
    })
}

/// Compares one call of each variant, times both, and optionally traces one of each; returns the
/// row and the crate's result of the compared call.
fn run_case(case: &Case, batch: &Batch, device: Device, opts: &Options) -> Result<(Row, Assigned)> {
    let (base, fast) = ((case.baseline)()?, (case.fast)()?);
    let gt_inds_mismatches = mismatches(&fast.gt_inds, &base.gt_inds)?;
    let labels_mismatches = mismatches(&fast.labels, &base.labels)?;
    let max_overlaps_max_abs_diff = max_abs_diff(&fast.max_overlaps, &base.max_overlaps)?;
    let assign_metrics_max_abs_diff = match (&fast.assign_metrics, &base.assign_metrics) {
        (Some(f), Some(b)) => Some(max_abs_diff(f, b)?),
        _ => None,
    };
    let positives = fast
        .gt_inds
        .f_gt(0)?
        .f_sum(Kind::Int64)?
        .f_int64_value(&[])?;
    drop(base);

    let clock = opts.clock(device);
    let (b, f): (Timing, Timing) =
        clock.time_pair(whole(|| (case.baseline)()), whole(|| (case.fast)()))?;

    if opts.profile {
        for (variant, run) in [("baseline", &case.baseline), ("crate", &case.fast)] {
            // The fastest of 3 traced calls: a call that a background load interrupted shows
            // the interruption as time in whichever op was running.
            let mut best: Option<(f64, profiler::Summary)> = None;
            for _ in 0..3 {
                let trace = profiler::Trace::start(profiler::TraceConfig {
                    cuda: matches!(device, Device::Cuda(_)),
                    ..profiler::TraceConfig::cpu()
                })?;
                let t = Instant::now();
                drop(run()?);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let summary = trace.stop(None)?;
                if best.as_ref().is_none_or(|(b, _)| ms < *b) {
                    best = Some((ms, summary));
                }
            }
            let (ms, summary) = best.context("no traced call")?;
            println!(
                "\n{} on {}, {variant}: top ops by self time (the fastest of 3 traced calls, {ms:.1} ms)\n```\n{}```",
                case.name,
                device_name(device),
                summary.table(PROFILE_TOP)
            );
        }
    }

    let row = Row {
        assigner: case.name,
        config: case.config,
        device: device_name(device),
        images: batch.gt_bboxes.len() as i64,
        priors_per_image: batch.num_priors(),
        classes: SHAPE.classes,
        gts_per_image: SHAPE.gts,
        baseline_ms: b.median_ms,
        crate_ms: f.median_ms,
        speedup: b.median_ms / f.median_ms,
        baseline_min_ms: b.min_ms,
        crate_min_ms: f.min_ms,
        baseline_spread: b.spread,
        crate_spread: f.spread,
        positives,
        gt_inds_mismatches,
        labels_mismatches,
        max_overlaps_max_abs_diff,
        assign_metrics_max_abs_diff,
        warmup: clock.warmup,
        reps: clock.reps,
        torch_threads: tch::get_num_threads(),
        crate_version: env!("CARGO_PKG_VERSION"),
    };
    Ok((row, fast))
}

/// The crate's results of every row as named CPU tensors, for `--save` and `--against`.
fn named(results: &[(String, Assigned)]) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for (key, r) in results {
        let mut put = |field: &str, t: &Tensor| {
            out.push((format!("{key}.{field}"), t.to_device(Device::Cpu)))
        };
        put("gt_inds", &r.gt_inds);
        put("max_overlaps", &r.max_overlaps);
        put("labels", &r.labels);
        if let Some(m) = &r.assign_metrics {
            put("assign_metrics", m);
        }
    }
    out
}

/// Whether two tensors hold the same bits (same shape and dtype, floats compared as integers of
/// their width, so that -0 differs from 0 and a NaN equals itself).
fn same_bits(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.size() != b.size() || a.kind() != b.kind() {
        return Ok(false);
    }
    let bits = |t: &Tensor| -> Result<Tensor> {
        Ok(match t.kind() {
            Kind::Float => t.f_view_dtype(Kind::Int)?,
            Kind::Double => t.f_view_dtype(Kind::Int64)?,
            Kind::Half | Kind::BFloat16 => t.f_view_dtype(Kind::Int16)?,
            _ => t.shallow_clone(),
        })
    };
    Ok(bits(a)?.equal(&bits(b)?))
}

fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| assigner | device | batch | baseline ms | crate ms | speedup | positives | gt_inds / labels mismatches | max \\|Δ\\| max_overlaps | max \\|Δ\\| assign_metrics |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} x {} priors, {} classes, {} gts | {:.2} | {:.2} | {:.2}x | {} | {} / {} | {:.3e} | {} |\n",
            r.assigner,
            r.device,
            r.images,
            r.priors_per_image,
            r.classes,
            r.gts_per_image,
            r.baseline_ms,
            r.crate_ms,
            r.speedup,
            r.positives,
            r.gt_inds_mismatches,
            r.labels_mismatches,
            r.max_overlaps_max_abs_diff,
            r.assign_metrics_max_abs_diff
                .map_or("-".to_string(), |d| format!("{d:.3e}")),
        );
    }
    s
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
    let devices = opts.devices()?;
    println!(
        "tch-detloss {} targets bench: batched assigners against MMDetection's per-image Python in stock tch ops",
        env!("CARGO_PKG_VERSION")
    );
    println!(
        "torch threads: {} | devices: {} | {} images x {}x{}, strides {:?}, {} classes, {} ground truths per image\n",
        tch::get_num_threads(),
        devices.iter().map(|d| device_name(*d)).collect::<Vec<_>>().join(", "),
        SHAPE.batch,
        SHAPE.image,
        SHAPE.image,
        workload::STRIDES,
        SHAPE.classes,
        SHAPE.gts
    );

    let wants = |a: &str| opts.assigner.as_deref().is_none_or(|w| w == a);
    let mut rows = Vec::new();
    let mut results = Vec::new();
    for &device in &devices {
        if wants("dsl") {
            eprint!(
                "\r\x1b[2KDynamicSoftLabelAssigner on {} ...",
                device_name(device)
            );
            let batch = Batch::new(SHAPE, Priors::Points, opts.seed, device)?;
            let case = dsl_case(&batch)?;
            let (row, r) = run_case(&case, &batch, device, &opts)?;
            results.push((format!("dsl.{}", device_name(device)), r));
            rows.push(row);
        }
        if wants("tal") {
            eprint!(
                "\r\x1b[2KTaskAlignedAssigner on {} ...",
                device_name(device)
            );
            let batch = Batch::new(SHAPE, Priors::Anchors, opts.seed, device)?;
            let case = tal_case(&batch)?;
            let (row, r) = run_case(&case, &batch, device, &opts)?;
            results.push((format!("tal.{}", device_name(device)), r));
            rows.push(row);
        }
        eprint!("\r\x1b[2K");
    }

    println!("\n{}", table(&rows));
    if let Some(parent) = opts.json.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(&rows)? + "\n")
        .with_context(|| format!("writing {}", opts.json.display()))?;
    println!(
        "{} rows written to {}; wall time {:.1} s",
        rows.len(),
        opts.json.display(),
        started.elapsed().as_secs_f64()
    );
    let named = named(&results);
    if let Some(path) = &opts.save {
        Tensor::save_multi(
            &named
                .iter()
                .map(|(k, t)| (k.as_str(), t))
                .collect::<Vec<_>>(),
            path,
        )
        .with_context(|| format!("saving the crate's results to {}", path.display()))?;
        println!("the crate's results saved to {}", path.display());
    }
    if let Some(path) = &opts.against {
        let saved: std::collections::HashMap<String, Tensor> = Tensor::load_multi(path)
            .with_context(|| format!("loading {}", path.display()))?
            .into_iter()
            .collect();
        let mut differ = Vec::new();
        for (key, t) in &named {
            match saved.get(key) {
                Some(s) if same_bits(t, s)? => {}
                Some(_) => differ.push(key.clone()),
                None => differ.push(format!("{key} (not in the file)")),
            }
        }
        ensure!(
            differ.is_empty(),
            "the crate's results differ from {} in: {}",
            path.display(),
            differ.join(", ")
        );
        println!(
            "the crate's results are bit-identical to {} ({} tensors)",
            path.display(),
            named.len()
        );
    }
    let disagree: Vec<&Row> = rows
        .iter()
        .filter(|r| r.gt_inds_mismatches != 0 || r.labels_mismatches != 0)
        .collect();
    ensure!(
        disagree.is_empty(),
        "the crate and the baseline disagree: {}",
        disagree
            .iter()
            .map(|r| format!(
                "{} on {}: {} gt_inds, {} labels",
                r.assigner, r.device, r.gt_inds_mismatches, r.labels_mismatches
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok(())
}
